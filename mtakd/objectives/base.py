"""Shared machinery of the base objectives: the registry and the token-level KD template.

Every base objective is a small module registering one :class:`Objective` subclass under a name.
Token-level divergences only implement :meth:`TokenDivergence.divergence` — the per-position
divergence between the student's and the teacher's next-token distributions; masking to response
tokens, temperature, the token mean and the mix with cross-entropy
(``L_base = (1 - kd_ratio)·CE + kd_ratio·KD``, DSKD's convention) live here, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ..config import ObjectiveConfig

OBJECTIVES: dict[str, type["Objective"]] = {}


def register(name: str):
    def deco(cls):
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} registered twice")
        cls.name = name
        OBJECTIVES[name] = cls
        return cls

    return deco


def build_objective(cfg: "ObjectiveConfig") -> "Objective":
    return OBJECTIVES[cfg.base](cfg)


def response_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(position mask [B,T-1], next-token targets [B,T-1]): logits at t predict labels at t+1."""
    targets = labels[:, 1:]
    return targets.ne(-100), targets


class Objective:
    """A base distillation objective. ``__call__`` returns named scalar losses; ``"loss"`` is optimised.

    Class attributes tell the trainer what the objective needs, so nothing else is computed:
    ``needs_teacher`` (teacher forward pass), ``needs_hidden_states`` (all layers' hidden states),
    ``needs_models`` (``__call__`` also gets the ``student=`` and ``teacher=`` modules, e.g. for their LM heads).

    Optional hooks, all no-ops here, for objectives that do more than score one batch (DistiLLM's
    student-generated outputs, DistiLLM-2's response pairs): :meth:`setup` (once, with the run config,
    tokenizer and models), :meth:`build_examples` / :meth:`collator` (dataset and batches),
    :meth:`prepare_inputs` (top of every ``compute_loss``), :meth:`callbacks` (TrainerCallbacks) and
    :meth:`save_state` / :meth:`load_state` (the objective's state inside every checkpoint).
    ``Options``: a pydantic model validating ``objective.options`` (None: the base takes no options).
    """

    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = True
    needs_hidden_states: ClassVar[bool] = False
    needs_models: ClassVar[bool] = False
    Options: ClassVar[type | None] = None

    def __init__(self, cfg: "ObjectiveConfig"):
        self.cfg = cfg
        self.opts = self.Options.model_validate(cfg.options) if self.Options is not None else None

    def __call__(self, student_out, teacher_out, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # ------------------------------------------------------------------------------ optional hooks
    def setup(self, run_cfg, tokenizer, student, teacher) -> None:
        """Called once by ``distill()`` after the models are built (layer counts, tokenizer, data settings)."""

    def build_examples(self, records, tokenizer, data_cfg, *, spans, stats, progress):
        """Tokenised examples of one data split (default: :func:`mtakd.data.build_examples`); ``spans``: the
        :class:`mtakd.data.SpanSettings` of MTA's units, or None."""
        from ..data import build_examples

        return build_examples(records, tokenizer, data_cfg, spans=spans, stats=stats, progress=progress)

    def collator(self, pad_token_id: int):
        from ..data import Collator

        return Collator(pad_token_id)

    def prepare_inputs(self, trainer, model, inputs: dict) -> dict:
        """Called at the top of ``compute_loss``; may replace the batch (e.g. by student-generated outputs)."""
        return inputs

    def callbacks(self) -> list:
        """TrainerCallbacks the trainer registers (e.g. reacting to evaluations)."""
        return []

    def teacher_cache_use(self) -> str:
        """How the base works with a teacher cache (``teacher.cache``, docs/teacher_cache.md): ``"full"`` (every
        teacher signal is read from the cache; the teacher is not loaded), ``"partial"`` (dataset batches read the
        cache, batches made during training run the loaded teacher) or ``"none"`` (refused, with
        :meth:`teacher_cache_reason`). Default ``"none"``: a base must declare what it reads from the teacher."""
        return "none"

    def teacher_cache_reason(self) -> str:
        """Why :meth:`teacher_cache_use` is ``"none"``: shown in the error."""
        return "it reads more of the teacher than the cache holds (next-token log-probabilities, MTA's key layers)"

    def save_state(self, directory: str, rank: int = 0) -> None:
        """Write the objective's training state (if any) into a checkpoint being saved, one file per process."""

    def load_state(self, directory: str, rank: int = 0) -> bool:
        """Restore what :meth:`save_state` wrote, when resuming from the checkpoint ``directory``."""
        return False


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precision → float32 for the losses; float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over response tokens (labels −100 elsewhere); 0 if there are none.
    Only response positions are gathered, so prompt and padding rows cost no [T, V] log-softmax."""
    mask, targets = response_positions(labels)
    if not mask.any():
        return logits.sum() * 0.0
    return F.cross_entropy(_upcast(logits[:, :-1][mask]), targets[mask])


@dataclass
class CachedLogProbs:
    """The teacher's next-token log-probabilities at a batch's response positions, read from a teacher cache
    (:mod:`mtakd.teacher_cache`), in the order :func:`response_positions` selects them: ``logp [N, k]`` with the
    token ids ``ids [N, k]`` of its top-k, or ``ids`` None when ``logp`` covers the whole vocabulary ``[N, V]``.
    Stands in for the teacher's ``logits`` in :meth:`TokenDivergence.kd_loss`."""

    logp: torch.Tensor
    ids: torch.Tensor | None


def topk_buckets(s_logp: torch.Tensor, t_logp_k: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) log-probabilities ``[N, k+1]`` over the teacher's top-k tokens plus one bucket holding the
    rest of the vocabulary: the student's full distribution ``s_logp [N, V]`` is gathered at ``ids`` and its
    remaining mass becomes the last bucket; the teacher's bucket is ``1 − Σ top-k`` (DistillKit's
    ``missing_probability_handling: symmetric_uniform`` for the KL; docs/objectives.md). Both are distributions
    on k+1 outcomes, so every divergence applies unchanged. A bucket's mass is floored at the smallest normal
    float (so a vanishing tail gives finite log-probabilities, not ``0·log 0``)."""
    tiny = torch.finfo(s_logp.dtype).tiny

    def with_rest(lp):
        rest = (-torch.expm1(torch.logsumexp(lp, -1, keepdim=True))).clamp_min(tiny).log()
        return torch.cat([lp, rest], -1)

    return with_rest(s_logp.gather(-1, ids)), with_rest(_upcast(t_logp_k))


class TokenDivergence(Objective):
    """Token-level KD: mean over response positions of ``divergence(student, teacher)``, mixed with CE.

    With a teacher cache (:class:`CachedLogProbs` in place of the teacher's logits), the full-vocabulary cache
    gives the same loss as the online teacher; a top-k cache compares the two distributions on the teacher's
    top-k tokens plus one bucket for the rest of the vocabulary (:func:`topk_buckets`)."""

    def teacher_cache_use(self) -> str:
        return "full"

    def divergence(self, s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
        """Per-position divergence ``[N]`` from log-probabilities ``[N, V]`` (student, teacher), or ``[N, k+1]``:
        the top-k buckets of a teacher cache (:func:`topk_buckets`); any divergence of two distributions on the
        same outcomes works on both."""
        raise NotImplementedError

    def kd_loss(self, s_logits: torch.Tensor, t_logits, labels: torch.Tensor) -> torch.Tensor:
        """Mean divergence over response positions; ``t_logits``: the teacher's ``[B, T, V]`` logits, or a
        :class:`CachedLogProbs` from a teacher cache."""
        mask, _ = response_positions(labels)
        # only response positions are gathered: [N, V] instead of [B, T, V]
        s = _upcast(s_logits[:, :-1][mask]) / self.cfg.temperature
        if isinstance(t_logits, CachedLogProbs) and t_logits.ids is not None:
            if s.shape[0] == 0:
                return s_logits.sum() * 0.0
            # top-k cache (temperature 1, checked when the cache is opened): the (k+1)-bucket distributions
            return self.divergence(*topk_buckets(F.log_softmax(s, -1), t_logits.logp, t_logits.ids)).mean()
        if isinstance(t_logits, CachedLogProbs):  # full vocabulary: log-probabilities are logits up to a constant
            t = _upcast(t_logits.logp) / self.cfg.temperature
        else:
            t = _upcast(t_logits[:, :-1][mask]) / self.cfg.temperature
        if s.shape[-1] != t.shape[-1]:  # padded embedding rows (e.g. Qwen): compare the shared vocabulary
            v = min(s.shape[-1], t.shape[-1])
            s, t = s[:, :v], t[:, :v]
        if s.shape[0] == 0:
            return s_logits.sum() * 0.0
        return self.divergence(F.log_softmax(s, -1), F.log_softmax(t, -1)).mean()

    def __call__(self, student_out, teacher_out, batch):
        labels = batch["labels"]
        ce = cross_entropy(student_out.logits, labels)
        kd = self.kd_loss(student_out.logits, teacher_out.logits, labels)
        r = self.cfg.kd_ratio
        return {"loss": (1 - r) * ce + r * kd, "ce": ce.detach(), "kd": kd.detach()}
