"""Adaptive KL (Wu et al., COLING 2025, "Rethinking Kullback-Leibler Divergence in Knowledge
Distillation for Large Language Models"), following DSKD's implementation:

    AKL = g_head/(g_head + g_tail)·KL(p ‖ q) + g_tail/(g_head + g_tail)·KL(q ‖ p)
    g_head = Σ_{v ∈ head} |p(v) − q(v)|,    g_tail = Σ_{v ∉ head} |p(v) − q(v)|    (both detached)

Head: sort the teacher probabilities in descending order (stable: ties keep vocabulary order) and
take the tokens up to *and including* the first one whose cumulative probability reaches
μ = cfg.akl_mu (i.e. ≥ μ). Equivalently, token v is in the head iff the teacher mass of the tokens
ranked strictly before it is < μ; the top token is always in the head. At μ = 0.5 this is DSKD's
split (tail = ascending cumulative mass < 0.5) except on an exact cumulative mass of 0.5, where
DSKD puts the next token in the head too. (DSKD thresholds the *ascending* cumulative sum at μ,
which for μ ≠ 0.5 amounts to our split at 1 − μ.) If p = q both gaps are 0 and AKL is 0.

On a top-k teacher cache the teacher's tail bucket ranks after its top-k tokens (:meth:`AdaptiveKL.bucket_divergence`).
"""

import torch

from .base import TokenDivergence, register
from .gjsd import kl


@register("akl")
class AdaptiveKL(TokenDivergence):
    def divergence(self, s_logp, t_logp):
        return self._weighted(s_logp, t_logp, rank=t_logp.exp())

    def bucket_divergence(self, s_logp, t_logp):
        """On a top-k cache's k + 1 outcomes: every token in the bucket (the last outcome) has at most the k-th
        token's probability, so the bucket ranks after every top-k token whatever its total mass: it is tail once
        Σ top-k ≥ μ, and (as one outcome) head otherwise."""
        p = t_logp.exp()
        return self._weighted(s_logp, t_logp, rank=torch.cat([p[:, :-1], torch.full_like(p[:, -1:], -1.0)], -1))

    def _weighted(self, s_logp, t_logp, rank):
        """AKL with the teacher's outcomes ordered by ``rank`` (descending, stable) for the head/tail split."""
        p, q = t_logp.exp().detach(), s_logp.exp().detach()
        order = rank.detach().argsort(dim=-1, descending=True, stable=True)
        cum = p.gather(-1, order).cumsum(-1)
        head = torch.cat([torch.ones_like(cum[:, :1], dtype=torch.bool), cum[:, :-1] < self.cfg.akl_mu], -1)
        gap = (p - q).abs().gather(-1, order)
        g_head, g_tail = (gap * head).sum(-1), (gap * ~head).sum(-1)
        total = (g_head + g_tail).clamp_min(torch.finfo(gap.dtype).tiny)
        return (g_head * kl(t_logp, s_logp) + g_tail * kl(s_logp, t_logp)) / total
