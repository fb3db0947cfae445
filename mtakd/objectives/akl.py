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
"""

import torch

from .base import TokenDivergence, register
from .gjsd import kl


@register("akl")
class AdaptiveKL(TokenDivergence):
    def divergence(self, s_logp, t_logp):
        p, q = t_logp.exp().detach(), s_logp.exp().detach()
        p_sorted, order = p.sort(dim=-1, descending=True, stable=True)
        cum = p_sorted.cumsum(-1)
        head = torch.cat([torch.ones_like(cum[:, :1], dtype=torch.bool), cum[:, :-1] < self.cfg.akl_mu], -1)
        gap = (p - q).abs().gather(-1, order)
        g_head, g_tail = (gap * head).sum(-1), (gap * ~head).sum(-1)
        total = (g_head + g_tail).clamp_min(torch.finfo(gap.dtype).tiny)
        return (g_head * kl(t_logp, s_logp) + g_tail * kl(s_logp, t_logp)) / total
