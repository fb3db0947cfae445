"""Supervised fine-tuning: next-token cross-entropy on the reference response, no teacher."""

from .base import Objective, chunked_cross_entropy, register


@register("sft")
class SFT(Objective):
    needs_teacher = False
    cross_tokenizer = True  # no teacher logits
    accepts_hidden_head = True  # CE chunked over response positions, LM head fused (objective.chunk_size)

    def teacher_cache_use(self) -> str:
        return "full"  # no teacher signal; with MTA, MTA's teacher side comes from the cache

    def __call__(self, student_out, teacher_out, batch):
        ce = chunked_cross_entropy(student_out.logits, batch["labels"], self.cfg.chunk_size)
        return {"loss": ce, "ce": ce.detach()}
