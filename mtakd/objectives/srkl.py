"""Skew reverse KL of DistiLLM (Ko et al., ICML 2024):

    SRKL_α = KL(q ‖ α·q + (1−α)·p),    α = cfg.skew_alpha (0.1)

α = 0 is the reverse KL; α = 1 is identically 0.
"""

from .base import TokenDivergence, register
from .gjsd import kl, log_mixture


@register("srkl")
class SkewReverseKL(TokenDivergence):
    def divergence(self, s_logp, t_logp):
        return kl(s_logp, log_mixture(s_logp, t_logp, self.cfg.skew_alpha))
