"""Skew KL of DistiLLM (Ko et al., ICML 2024):

    SKL_α = KL(p ‖ α·p + (1−α)·q),    α = cfg.skew_alpha (0.1)

α = 0 is the forward KL; α = 1 is identically 0.
"""

from .base import TokenDivergence, register
from .gjsd import kl, log_mixture


@register("skl")
class SkewKL(TokenDivergence):
    def divergence(self, s_logp, t_logp):
        return kl(t_logp, log_mixture(t_logp, s_logp, self.cfg.skew_alpha))
