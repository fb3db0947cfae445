"""Reverse KL, KL(q_S ‖ p_T): the mode-seeking objective of MiniLLM (Gu et al., ICLR 2024), token level."""

from .base import TokenDivergence, register


@register("rkl")
class ReverseKL(TokenDivergence):
    def divergence(self, s_logp, t_logp):
        return (s_logp.exp() * (s_logp - t_logp)).sum(-1)
