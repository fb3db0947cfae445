"""Registry of base distillation objectives: one small module per objective, selected by name."""

from .base import OBJECTIVES, Objective, TokenDivergence, build_objective, register

# importing the modules registers them
from . import akl, fkl, gjsd, js, rkl, sft, skl, srkl, tvd  # noqa: E402,F401
from . import uld  # noqa: E402,F401  (cross-tokenizer: different vocabularies)
from . import distillm, distillm2, fdd  # noqa: E402,F401  (bases of the MTA paper)

__all__ = ["OBJECTIVES", "Objective", "TokenDivergence", "build_objective", "register"]
