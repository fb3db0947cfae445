"""DistiLLM-2 (Ko et al., ICML 2025, "DistiLLM-2: A Contrastive Approach Boosts the Distillation of LLMs").

Each training prompt x comes with a teacher-generated response y_t (the record's ``output``) and a
student-generated response y_s (``student_output``), both generated once before training with
``mtakd generate`` (the official code pre-generates them with vLLM). The contrastive loss pushes the
student up on the teacher's response and down on its own:

    L = mean over pairs [ (2 − β)·SKL_α₁(p ‖ q)(y_t | x) + β·SRKL_α₂(p ‖ q)(y_s | x) ]
    SKL_α(p ‖ q)  = KL(p ‖ α·p + (1−α)·q)                        (on teacher responses)
    SRKL_α(p ‖ q) = KL(q ‖ α·sg(q) + (1−α)·p)                    (on student responses)

p: teacher, q: student next-token distributions; each response's divergence is the mean over its
response tokens, then averaged over the pairs of the batch (sequence-level mean, as the official
trainer's per-sequence ``position_kl``). β = 1 (default) is the released ``distillm_v2`` loss, the sum
of the two terms. ``L_base = (1 − kd_ratio)·CE(y_t) + kd_ratio·L`` (the paper uses kd_ratio 1).

Documented choices (see docs/objectives.md):

- α₁ = α₂ = ``objective.skew_alpha`` (0.1, the official scripts' ``base_alpha_1/2``) unless
  ``options.teacher_alpha`` / ``options.student_alpha`` are set. The released code's per-sample
  *adaptive* α (clipped from the initial teacher/student likelihood gap) is not implemented.
- ``sg`` (stop-gradient) on the student inside the SRKL mixture, as in the released trainer
  (``options.detach_mixture: false`` uses the plain SRKL of :mod:`.srkl`).
- ``options.beta_schedule: gradual`` raises β linearly from ``options.beta`` by 0.5 over the first half
  of training (the released code's ``gradual_beta`` curriculum); ``constant`` (default) keeps β.
- A batch holds 2·B sequences: rows ``[0, B)`` are the teacher-response sequences, rows ``[B, 2B)`` the
  student-response ones, padded to one length and run through each model in one forward pass.
  **MTA applies to the teacher-response sequences only** (the batch's ``mta_rows = B``); spans are
  built for them only.
- A response with no token left after truncation is left out of the mean.
- A teacher cache (``teacher.cache``, built with this base's config) holds the teacher's signals on both
  sequences of every pair; a top-k cache gives SKL and SRKL on the same k+1 buckets (docs/teacher_cache.md).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from .base import (CachedLogProbs, HiddenHead, Objective, _upcast, chunked_row_loss, compared_logp, cross_entropy,
                   register, response_positions)
from .gjsd import kl, log_mixture

log = logging.getLogger(__name__)


class DistiLLM2Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    teacher_alpha: float | None = Field(None, gt=0, lt=1, description="α₁ of SKL on teacher responses (default skew_alpha)")
    student_alpha: float | None = Field(None, gt=0, lt=1, description="α₂ of SRKL on student responses (default skew_alpha)")
    beta: float = Field(1.0, ge=0, le=1.5, description="L = (2−β)·SKL + β·SRKL")
    beta_schedule: Literal["constant", "gradual"] = "constant"
    detach_mixture: bool = Field(True, description="stop-gradient on the student inside the SRKL mixture")


def _per_sequence_mean(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of ``values`` per row ``[n_rows]``, bool: the row has at least one value)."""
    sums = torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, values)
    counts = torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, torch.ones_like(values))
    return sums / counts.clamp_min(1), counts > 0


def distillm2_divergences(
    s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor, n_pairs: int, *,
    teacher_alpha: float, student_alpha: float, temperature: float = 1.0, detach_mixture: bool = True,
    vocab: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(SKL on the teacher responses, SRKL on the student responses), each a mean over sequences of the
    per-sequence token mean. Rows ``[0, n_pairs)`` of the ``[2·n_pairs, T, V]`` logits are teacher-response
    sequences, rows ``[n_pairs, 2·n_pairs)`` student-response ones; ``labels`` are −100 off the responses.
    ``t_logits``: the teacher's logits, or a teacher cache's :class:`CachedLogProbs` of the batch's response
    positions (a top-k cache: both divergences on the k+1 buckets, :func:`~mtakd.objectives.base.compared_logp`)."""
    mask, _ = response_positions(labels)
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(mask)[mask]
    t = t_logits if isinstance(t_logits, CachedLogProbs) else t_logits[:, :-1][mask].detach()
    s_logp, t_logp = compared_logp(_upcast(s_logits[:, :-1][mask]), t, temperature, vocab)
    on_teacher = rows < n_pairs
    zero = s_logits.sum() * 0.0
    out = []
    for side, pick in (("teacher", on_teacher), ("student", ~on_teacher)):
        if not bool(pick.any()):
            out.append(zero)
            continue
        sl, tl = s_logp[pick], t_logp[pick]
        if side == "teacher":
            per_token = kl(tl, log_mixture(tl, sl, teacher_alpha))
        else:
            mix_q = sl.detach() if detach_mixture else sl
            per_token = kl(sl, log_mixture(mix_q, tl, student_alpha))
        local = rows[pick] - (0 if side == "teacher" else n_pairs)
        means, valid = _per_sequence_mean(per_token, local, n_pairs)
        out.append(means[valid].mean())
    return out[0], out[1]


def distillm2_chunked(
    student, teacher, labels: torch.Tensor, n_pairs: int, *, teacher_alpha: float, student_alpha: float,
    temperature: float, detach_mixture: bool, beta: float, kd_ratio: float, chunk_size: int, vocab: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L_base, CE, SKL, SRKL)`` of :func:`distillm2_divergences` and :class:`DistiLLM2`, computed ``chunk_size``
    response positions at a time (:func:`~mtakd.objectives.base.chunked_row_loss`): each position's per-sequence
    mean is a fixed weight ``1 / (tokens of its response · responses of its side)``, so the loss is a weighted sum
    over positions with the unchunked gradients. ``student``/``teacher``: logits or
    :class:`~mtakd.objectives.base.HiddenHead`; ``teacher`` also a teacher cache's :class:`CachedLogProbs`."""
    mask, targets = response_positions(labels)
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(mask)[mask]
    counts = mask.sum(1).to(torch.float64)
    on_teacher = rows < n_pairs
    valid = counts > 0
    n_valid = torch.stack([valid[:n_pairs].sum(), valid[n_pairs:].sum()]).clamp_min(1).to(torch.float64)
    weight = 1.0 / (counts[rows] * n_valid[(~on_teacher).long()])
    ce_weight = on_teacher.to(torch.float64) / max(int(on_teacher.sum()), 1)
    y = targets[mask]

    def score(z, t, lo, hi):
        z = _upcast(z)
        s_logp, t_logp = compared_logp(z, t, temperature, vocab)
        pick, w = on_teacher[lo:hi], weight[lo:hi].to(z.dtype)
        skl = (w[pick] * kl(t_logp[pick], log_mixture(t_logp[pick], s_logp[pick], teacher_alpha))).sum()
        sl = s_logp[~pick]
        mix_q = sl.detach() if detach_mixture else sl
        srkl = (w[~pick] * kl(sl, log_mixture(mix_q, t_logp[~pick], student_alpha))).sum()
        ce = (ce_weight[lo:hi].to(z.dtype) * F.cross_entropy(z, y[lo:hi], reduction="none")).sum()
        return (1 - kd_ratio) * ce + kd_ratio * ((2 - beta) * skl + beta * srkl), ce, skl, srkl

    return chunked_row_loss(student, teacher, mask, score, chunk_size, n_logged=3)


@dataclass
class PairExample:
    """One prompt with its teacher-response and student-response sequences (spans on the teacher's only)."""

    teacher: object  # mtakd.data.Example
    student: object

    @property
    def sequences(self) -> tuple:
        """Both sequences in :class:`PairCollator`'s row order (a teacher cache's entries 2i and 2i + 1)."""
        return self.teacher, self.student


class PairCollator:
    """Collates :class:`PairExample` into one ``[2B, T]`` batch: teacher-response rows first, then the
    student-response rows; ``word_spans``/``phrase_spans`` cover the first B rows; ``mta_rows = B``."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = 8):
        from ..data import Collator

        self.base = Collator(pad_token_id, pad_to_multiple_of)
        self.pad = pad_token_id

    def __call__(self, examples: list[PairExample]) -> dict:
        first = self.base([e.teacher for e in examples])
        second = self.base([e.student for e in examples])
        width = max(first["input_ids"].shape[1], second["input_ids"].shape[1])
        fill = {"input_ids": self.pad, "attention_mask": 0, "labels": -100}
        batch = {}
        for key, value in fill.items():
            batch[key] = torch.cat(
                [F.pad(b[key], (0, width - b[key].shape[1]), value=value) for b in (first, second)]
            )
        for key in first:
            if key.endswith("_spans"):
                batch[key] = F.pad(first[key], (0, width - first[key].shape[-1]), value=False)
        batch["mta_rows"] = len(examples)
        return batch


@register("distillm2")
class DistiLLM2(Objective):
    """DistiLLM-2: SKL on teacher responses + SRKL on student responses (contrastive)."""

    Options = DistiLLM2Options
    accepts_hidden_head = True
    sequences_per_example = 2
    mta_sequences = 1  # the teacher responses (PairCollator's mta_rows)

    def teacher_cache_use(self) -> str:
        # the pairs are fixed before training: the teacher's log-probabilities on both sequences, and MTA's key
        # layers on the teacher-response ones (mta_sequences), are all cached (docs/teacher_cache.md)
        return "full"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.progress = 0.0  # fraction of training done, for the gradual β schedule

    def beta(self) -> float:
        if self.opts.beta_schedule == "gradual":
            return self.opts.beta + 0.5 * min(1.0, 2.0 * self.progress)
        return self.opts.beta

    # ------------------------------------------------------------------------------------- data
    def build_examples(self, records, tokenizer, data_cfg, *, spans, stats, progress):
        from ..data import DataError, DataStats, build_examples

        missing = [r.where for r in records if r.student_output is None]
        if missing:
            raise DataError(
                f"{missing[0]}: base objective distillm2 needs a student-generated response in field "
                f"'student_output' ({len(missing)} record(s) lack it); create it with "
                "`mtakd generate --model STUDENT --data FILE --out OUT --field student_output`"
            )
        teacher = build_examples(records, tokenizer, data_cfg, spans=spans, stats=stats, progress=progress)
        student_stats = DataStats()
        student = build_examples(
            [dataclasses.replace(r, output=r.student_output) for r in records], tokenizer, data_cfg,
            spans=None, stats=student_stats, progress=False,
        )
        log.info("distillm2 student responses: %s", student_stats.summary())
        return [PairExample(t, s) for t, s in zip(teacher, student)]

    def collator(self, pad_token_id: int):
        return PairCollator(pad_token_id)

    def prepare_inputs(self, trainer, model, inputs):
        if model.training and trainer.state.max_steps:
            self.progress = trainer.state.global_step / trainer.state.max_steps
        return inputs

    # ------------------------------------------------------------------------------------- loss
    def __call__(self, student_out, teacher_out, batch):
        labels = batch["labels"]
        n = labels.shape[0] // 2
        alpha = self.cfg.skew_alpha
        chunked = self.cfg.chunk_size > 0 or isinstance(student_out.logits, HiddenHead)
        if chunked:
            beta = self.beta()
            loss, ce, skl, srkl = distillm2_chunked(
                student_out.logits, teacher_out.logits, labels, n,
                teacher_alpha=self.opts.teacher_alpha or alpha, student_alpha=self.opts.student_alpha or alpha,
                temperature=self.cfg.temperature, detach_mixture=self.opts.detach_mixture, beta=beta,
                kd_ratio=self.cfg.kd_ratio, chunk_size=self.cfg.chunk_size, vocab=self.vocab,
            )
            kd = (2 - beta) * skl + beta * srkl
            return {"loss": loss, "ce": ce.detach(), "kd": kd.detach(), "skl": skl.detach(), "srkl": srkl.detach()}
        skl, srkl = distillm2_divergences(
            student_out.logits, teacher_out.logits, labels, n,
            teacher_alpha=self.opts.teacher_alpha or alpha, student_alpha=self.opts.student_alpha or alpha,
            temperature=self.cfg.temperature, detach_mixture=self.opts.detach_mixture, vocab=self.vocab,
        )
        beta = self.beta()
        kd = (2 - beta) * skl + beta * srkl
        ce = cross_entropy(student_out.logits[:n], labels[:n])
        r = self.cfg.kd_ratio
        return {"loss": (1 - r) * ce + r * kd, "ce": ce.detach(), "kd": kd.detach(), "skl": skl.detach(),
                "srkl": srkl.detach()}
