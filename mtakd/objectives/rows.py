"""What a token-level loss reads, row by row: the response positions of a batch, a teacher cache's log-probabilities
(:class:`CachedLogProbs`), a hidden state with its LM head (:class:`HiddenHead`) and the vocabulary rows both sides
share. Below both the chunked loss (:mod:`.base`) and the fused kernels (:mod:`.fused`); also importable from
:mod:`mtakd.objectives.base`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def response_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(position mask [B,T-1], next-token targets [B,T-1]): logits at t predict labels at t+1."""
    targets = labels[:, 1:]
    return targets.ne(-100), targets


@dataclass
class CachedLogProbs:
    """The teacher's next-token log-probabilities at a batch's response positions, read from a teacher cache
    (:mod:`mtakd.teacher_cache`), in the order :func:`response_positions` selects them: ``logp [N, k]`` with the
    token ids ``ids [N, k]`` of its top-k and ``rest [N]``, the log of the teacher's mass outside them (computed
    from its full distribution when the cache was built, :meth:`top_k`), or ``ids`` and ``rest`` None when ``logp``
    covers the whole vocabulary ``[N, V]``. Stands in for the teacher's ``logits`` in
    :meth:`.base.TokenDivergence.kd_loss`."""

    logp: torch.Tensor
    ids: torch.Tensor | None
    rest: torch.Tensor | None = None

    def __post_init__(self):
        if (self.ids is None) != (self.rest is None):
            raise ValueError("a top-k CachedLogProbs needs both ids and rest (the teacher's leftover log-mass)")

    @classmethod
    def top_k(cls, logp: torch.Tensor, k: int) -> "CachedLogProbs":
        """The top-k entry of full log-probabilities ``logp [N, V]``: values, ids and the leftover log-mass
        :func:`log_rest` (what ``mtakd cache-teacher --top-k k`` stores)."""
        values, ids = logp.topk(k, dim=-1)
        return cls(values, ids, log_rest(logp, ids).squeeze(-1))

    def rows(self, lo: int, hi: int) -> "CachedLogProbs":
        cut = lambda x: None if x is None else x[lo:hi]  # noqa: E731
        return CachedLogProbs(self.logp[lo:hi], cut(self.ids), cut(self.rest))


def shared_rows(*rows: int, vocab: int | None = None) -> int:
    """The rows two next-token distributions are compared on: those both heads have (``rows``), cut to the
    tokenizer's ``vocab`` ids when known (:meth:`.base.Objective.set_vocabulary`): padded rows are left out."""
    return min([*rows, *([vocab] if vocab else [])])


def log_rest(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``log Σ_{v ∉ ids} p(v)`` per row ``[N, 1]`` from full log-probabilities ``logp [N, V]``: the logsumexp of
    ``logp`` with the ``ids`` masked, so a vanishing rest keeps its relative precision (``1 − Σ_ids p`` cannot
    resolve a rest below float32's ~6e-8). With every id masked the result is ``≤ log(tiny)`` (see
    :func:`.base.topk_buckets`), never NaN, and differentiable."""
    return logp.scatter(-1, ids, torch.finfo(logp.dtype).min).logsumexp(-1, keepdim=True)


@dataclass
class HiddenHead:
    """A model's last hidden state ``[B, T, d]`` (after the final norm) with its LM head (hidden → logits): stands
    in for the model's ``logits`` so that the loss computes the logits one chunk of response positions at a time
    (``objective.chunk_size``) and the full ``[B, T, V]`` logits are never materialised. The trainer passes it when
    the forward pass ran with ``logits_to_keep=1`` (docs/scaling.md)."""

    hidden: torch.Tensor
    head: Callable[[torch.Tensor], torch.Tensor]
