"""Forward KL, KL(p_T ‖ q_S): the classic word-level KD (Hinton et al. 2015; Kim & Rush 2016)."""

from .base import TokenDivergence, register


@register("fkl")
class ForwardKL(TokenDivergence):
    def divergence(self, s_logp, t_logp):
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1)
