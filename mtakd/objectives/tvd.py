"""Total variation distance, TVD = ½·Σ_v |p(v) − q(v)| (as in DistiLLM's baselines; Wen et al., ACL 2023)."""

from .base import TokenDivergence, register


@register("tvd")
class TotalVariation(TokenDivergence):
    def divergence(self, s_logp, t_logp):
        return 0.5 * (t_logp.exp() - s_logp.exp()).abs().sum(-1)
