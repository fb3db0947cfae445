"""Generalised Jensen–Shannon divergence, as in TRL's GKD trainer (Agarwal et al., ICLR 2024, Eq. 1).

    m = β·p + (1−β)·q,    GJSD_β = β·KL(p ‖ m) + (1−β)·KL(q ‖ m),    β = cfg.gjsd_beta

(p: teacher, q: student). Also home of the two helpers the skewed divergences share: a KL from
log-probabilities and a two-component mixture computed in log space.
"""

import math

import torch

from .base import TokenDivergence, register


def kl(a_logp: torch.Tensor, b_logp: torch.Tensor) -> torch.Tensor:
    """KL(a ‖ b) = Σ a·(log a − log b), per row. Finite whenever both log-probabilities are finite
    (a vanishing ``a`` just multiplies a finite difference: no 0·log 0)."""
    return (a_logp.exp() * (a_logp - b_logp)).sum(-1)


def log_mixture(a_logp: torch.Tensor, b_logp: torch.Tensor, w: float) -> torch.Tensor:
    """log(w·a + (1−w)·b) by log-sum-exp; w ∈ [0, 1] (a zero weight is log 0 = −inf, which is exact). At w = 0 or 1
    the mixture is one side itself, returned as is: the same values and gradients without three ``[N, V]`` tensors."""
    if w == 0:
        return b_logp
    if w == 1:
        return a_logp
    log_w = math.log(w) if w > 0 else -math.inf
    log_1mw = math.log1p(-w) if w < 1 else -math.inf
    return torch.logaddexp(a_logp + log_w, b_logp + log_1mw)


@register("gjsd")
class GeneralisedJSD(TokenDivergence):
    def beta(self) -> float:
        return self.cfg.gjsd_beta

    def divergence(self, s_logp, t_logp):
        b = self.beta()
        m_logp = log_mixture(t_logp, s_logp, b)
        return b * kl(t_logp, m_logp) + (1 - b) * kl(s_logp, m_logp)
