"""Universal Logit Distillation (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit
Distillation Loss for LLMs", arXiv:2402.12030): a logit loss for teacher and student with *different* vocabularies.

    L_base = (1 − kd_ratio)·CE + kd_ratio·ULD
    ULD    = mean over aligned response positions i of  Σ_j | sort↓(q_S,i)_j − sort↓(p_T,i)_j |

Each next-token distribution (temperature ``objective.temperature``) is sorted in descending order and the
shorter vector is zero-padded to the larger vocabulary; with a uniform transport cost the Wasserstein-1 distance
between the two distributions then reduces to this L1 distance of the sorted vectors (the paper's closed form),
which is 0 exactly when the two distributions are equal up to a permutation of the vocabulary.

Positions are aligned as in the paper's code (Nicolas-BZRD/llm-recipes, ``ULDLoss``): the i-th response token of
the student with the i-th response token of the teacher's own tokenisation (``teacher_labels`` in a
cross-tokenizer batch, else the shared ``labels``), truncated per sequence to the shorter of the two responses.
Documented choice (docs/objectives.md): the mean runs over all aligned positions of the micro-batch (the token
mean of every other base; the official code averages per sequence, then over sequences).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Objective, _upcast, chunked_cross_entropy, register, response_positions


def aligned_response_positions(s_labels: torch.Tensor, t_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks ``[B, T_S-1]`` and ``[B, T_T-1]`` of the logits positions ULD compares: in each row, the first
    ``min(n_S, n_T)`` response positions of each side (n: the row's response tokens), so the i-th selected student
    position (row-major) pairs with the i-th selected teacher position."""
    s_mask, _ = response_positions(s_labels)
    t_mask, _ = response_positions(t_labels)
    n = torch.minimum(s_mask.sum(-1), t_mask.sum(-1))[:, None]
    return s_mask & (s_mask.cumsum(-1) <= n), t_mask & (t_mask.cumsum(-1) <= n)


def sorted_l1(s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    """Per position ``[N]``: L1 distance between the descending-sorted probabilities ``[N, V_S]`` and ``[N, V_T]``,
    the shorter zero-padded to the longer vocabulary."""
    s = s_logp.exp().sort(-1, descending=True).values
    t = t_logp.exp().sort(-1, descending=True).values
    v = max(s.shape[-1], t.shape[-1])
    s, t = F.pad(s, (0, v - s.shape[-1])), F.pad(t, (0, v - t.shape[-1]))
    return (s - t).abs().sum(-1)


@register("uld")
class ULD(Objective):
    """Universal Logit Distillation (Boizard et al. 2024): L1 between sorted, zero-padded next-token probabilities."""

    cross_tokenizer = True

    def teacher_cache_reason(self) -> str:
        return ("it sorts the teacher's full next-token distribution at the teacher's own response positions; a cache "
                "holds the teacher's log-probabilities at the student's positions (top-k: not the whole distribution)")

    def kd_loss(self, s_logits: torch.Tensor, t_logits: torch.Tensor, s_labels: torch.Tensor,
                t_labels: torch.Tensor) -> torch.Tensor:
        s_mask, t_mask = aligned_response_positions(s_labels, t_labels)
        if not s_mask.any():
            return s_logits.sum() * 0.0
        s = F.log_softmax(_upcast(s_logits[:, :-1][s_mask]) / self.cfg.temperature, -1)
        t = F.log_softmax(_upcast(t_logits[:, :-1][t_mask]) / self.cfg.temperature, -1)
        return sorted_l1(s, t).mean()

    def __call__(self, student_out, teacher_out, batch):
        labels = batch["labels"]
        ce = chunked_cross_entropy(student_out.logits, labels, self.cfg.chunk_size)
        kd = self.kd_loss(student_out.logits, teacher_out.logits, labels, batch.get("teacher_labels", labels))
        r = self.cfg.kd_ratio
        return {"loss": (1 - r) * ce + r * kd, "ce": ce.detach(), "kd": kd.detach()}
