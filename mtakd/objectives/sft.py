"""Supervised fine-tuning: next-token cross-entropy on the reference response, no teacher."""

from .base import Objective, cross_entropy, register


@register("sft")
class SFT(Objective):
    needs_teacher = False

    def teacher_cache_use(self) -> str:
        return "full"  # no teacher signal; with MTA, MTA's teacher side comes from the cache

    def __call__(self, student_out, teacher_out, batch):
        ce = cross_entropy(student_out.logits, batch["labels"])
        return {"loss": ce, "ce": ce.detach()}
