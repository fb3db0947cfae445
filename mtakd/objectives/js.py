"""Jensen–Shannon divergence (Lin 1991), as used for LLM KD by DistiLLM / DSKD:

    m = (p + q)/2,    JS = ½·KL(p ‖ m) + ½·KL(q ‖ m)

— the generalised JSD of :mod:`.gjsd` with β = ½.
"""

from .base import register
from .gjsd import GeneralisedJSD


@register("js")
class JensenShannon(GeneralisedJSD):
    def beta(self) -> float:
        return 0.5
