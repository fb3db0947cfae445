"""Optional fused kernels for the token-level base loss: Liger-Kernel on a CUDA GPU (docs/scaling.md).

``objective.fused_kernel`` chooses who computes ``L_base = (1 − kd_ratio)·CE + kd_ratio·KD`` when the trainer hands
the loss both models' last hidden states and LM heads (:class:`~mtakd.objectives.base.HiddenHead`):

- ``none`` (default): mtakd's own chunked computation (:meth:`TokenDivergence.base_loss`);
- ``liger``: Liger-Kernel's Triton kernels, required: a config or a batch they cannot compute is an error;
- ``auto``: Liger-Kernel where it applies, else the chunked computation; never an error.

Liger-Kernel (``pip install 'mtakd[liger]'``) is imported only when asked for, and never needed otherwise. Its
``LigerFusedLinearJSD`` computes the generalised JSD with the teacher as p and the student as q,
``m = β·p + (1−β)·q``, ``β·KL(p ‖ m) + (1−β)·KL(q ‖ m)`` — mtakd's ``gjsd`` — and special-cases β = 0 / 1 as
exactly KL(p ‖ q) / KL(q ‖ p), mtakd's ``fkl`` / ``rkl``; logits divided by the temperature, averaged over the rows
it is given. ``LigerFusedLinearCrossEntropyLoss`` gives the CE. Each kernel multiplies the hidden rows by the head
in chunks and takes the gradients in the forward pass, as mtakd's chunked path does.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from .rows import CachedLogProbs, HiddenHead, response_positions, shared_rows

# `ObjectiveConfig` in annotations is mtakd.config's; not imported, not even for type checking: the
# config validates against this module, which must not depend on it (tests/test_imports.py)

logger = logging.getLogger(__name__)

# device types Liger's Triton kernels run on (ROCm GPUs are "cuda" in torch too)
DEVICE_TYPES: tuple[str, ...] = ("cuda",)


class FusedKernelError(RuntimeError):
    """``objective.fused_kernel: liger`` was asked for and cannot compute this batch's loss."""


def liger_beta(cfg: "ObjectiveConfig") -> float | None:
    """β of Liger's generalised JSD equal to ``cfg.base``'s divergence, or None: the base has no Liger kernel."""
    return {"fkl": 0.0, "rkl": 1.0, "js": 0.5, "gjsd": cfg.gjsd_beta}.get(cfg.base)


LIGER_BASES = ("fkl", "rkl", "js", "gjsd")


@dataclass(frozen=True)
class LigerKernels:
    """The two Liger-Kernel modules mtakd calls (their classes; built per call with the run's settings)."""

    jsd: type  # liger_kernel.transformers.LigerFusedLinearJSD
    cross_entropy: type  # liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss


@functools.cache
def _import_liger() -> tuple[LigerKernels | None, str]:
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD
    except Exception as e:  # not installed, or Triton failing to load
        return None, f"{type(e).__name__}: {e}"
    return LigerKernels(LigerFusedLinearJSD, LigerFusedLinearCrossEntropyLoss), ""


def liger_kernels() -> LigerKernels | None:
    """Liger-Kernel's fused linear JSD and cross-entropy, or None when ``liger_kernel`` cannot be imported."""
    return _import_liger()[0]


def config_problem(cfg: "ObjectiveConfig") -> str | None:
    """Why ``objective.fused_kernel: liger`` cannot be used with this objective section on this machine, or None."""
    if liger_beta(cfg) is None:
        return (f"Liger-Kernel has a fused kernel only for the bases {', '.join(LIGER_BASES)} (its generalised JSD; "
                f"β = 0 / 1 are the forward / reverse KL), not for {cfg.base!r}; set objective.fused_kernel: auto "
                "(falls back to the chunked loss) or none")
    if cfg.chunk_size == 0:
        return ("Liger-Kernel takes the models' last hidden states and LM heads, which objective.chunk_size: 0 turns "
                "off (full logits); set a chunk size > 0")
    if liger_kernels() is None:
        return (f"Liger-Kernel cannot be imported ({_import_liger()[1]}); install it with pip install 'mtakd[liger]' "
                "(needs a CUDA GPU and Triton), or set objective.fused_kernel: auto or none")
    if not torch.cuda.is_available():
        return "Liger-Kernel's Triton kernels need a CUDA GPU and none is visible; set objective.fused_kernel: auto or none"
    return None


def linear_weight(head) -> torch.Tensor | None:
    """The ``[V, d]`` weight of an LM head that is a plain bias-free linear layer (what Liger's kernels take)."""
    weight = getattr(head, "weight", None)
    if not isinstance(head, torch.nn.Module) or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    if getattr(head, "bias", None) is not None or type(head).forward is not torch.nn.Linear.forward:
        return None
    return weight


def _why_not(obj, student, teacher) -> str | None:
    """Why Liger's kernels cannot compute this call of ``obj.base_loss``, or None."""
    if obj.cfg.base != obj.name or liger_beta(obj.cfg) is None:  # e.g. FDD's inner divergence
        return f"base {obj.name!r} has no Liger kernel"
    if liger_kernels() is None:
        return f"Liger-Kernel cannot be imported ({_import_liger()[1]})"
    if isinstance(teacher, CachedLogProbs):
        return "the teacher's signals come from a teacher cache (log-probabilities, not its hidden state)"
    if not (isinstance(student, HiddenHead) and isinstance(teacher, HiddenHead)):
        return ("the trainer gave full logits, not hidden states and LM heads (objective.chunk_size 0, FSDP, "
                "DeepSpeed ZeRO-3 or a head the model post-processes: docs/scaling.md)")
    if linear_weight(student.head) is None or linear_weight(teacher.head) is None:
        return "an LM head is not a bias-free linear layer"
    if any(x.hidden.device.type not in DEVICE_TYPES for x in (student, teacher)):
        return f"the models are on {student.hidden.device.type}, and Liger's Triton kernels need a CUDA GPU"
    return None


@functools.cache
def _note_fallback(why: str) -> None:
    logger.info("objective.fused_kernel auto: the chunked loss is used, not Liger-Kernel: %s", why)


def fused_base_loss(obj, student, teacher, labels: torch.Tensor, kd_ratio: float, with_ce: bool):
    """``(L_base, CE, KD)`` of ``obj`` (a :class:`TokenDivergence`) computed by Liger-Kernel, or None when
    ``objective.fused_kernel`` is ``auto`` and the kernels do not apply (the caller then computes it itself)."""
    why = _why_not(obj, student, teacher)
    if why is None:
        return liger_base_loss(liger_kernels(), student, teacher, labels, beta=liger_beta(obj.cfg),
                               temperature=obj.cfg.temperature, kd_ratio=kd_ratio, with_ce=with_ce, vocab=obj.vocab)
    if obj.cfg.fused_kernel == "liger":
        raise FusedKernelError(f"objective.fused_kernel: liger cannot compute the loss: {why}")
    _note_fallback(why)
    return None


def liger_base_loss(kernels: LigerKernels, student: HiddenHead, teacher: HiddenHead, labels: torch.Tensor, *,
                    beta: float, temperature: float, kd_ratio: float, with_ce: bool = True, vocab: int | None = None):
    """``(L_base, CE, KD)`` exactly as :meth:`TokenDivergence.base_loss` defines them — token means over the response
    positions (``labels`` ≠ −100 at t + 1), KD at ``temperature`` over the vocabulary both heads share (padded
    embedding rows cut off: :func:`~mtakd.objectives.base.shared_rows`), CE over the student's whole vocabulary — with Liger's kernels on the response rows
    of both models' last hidden states. ``with_ce`` False: CE is not computed (0)."""
    mask, targets = response_positions(labels)
    y = targets[mask]
    h_s = student.hidden[:, :-1][mask]  # [N, d]: only response rows reach the kernels
    with torch.no_grad():
        h_t = teacher.hidden[:, :-1][mask]
    w_s, w_t = linear_weight(student.head), linear_weight(teacher.head)
    # under mixed precision accelerate returns float32 hidden states; a bf16 head (e.g. teacher.dtype: bfloat16)
    # takes its rows in its own dtype, as mtakd.models.apply_head does for the chunked loss
    h_s, h_t = h_s.to(w_s.dtype), h_t.to(w_t.dtype)
    if y.numel() == 0:
        zero = h_s.sum() * 0.0 + w_s.sum() * 0.0
        return zero, zero.detach(), zero.detach()
    v = shared_rows(w_s.shape[0], w_t.shape[0], vocab=vocab)
    kd = kernels.jsd(jsd_beta=beta, temperature=temperature)(h_s, w_s[:v], h_t, w_t[:v], None)
    ce = kernels.cross_entropy(reduction="mean")(w_s, h_s, y) if with_ce else kd.detach() * 0.0
    return (1 - kd_ratio) * ce + kd_ratio * kd, ce, kd
