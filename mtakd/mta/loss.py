"""MTA as a plug-in loss: all key layers in one batched pass (MTA_SPEC §4–§7).

    L_MTA = λ_DSA · mean_l L_DSA^(l) + λ_Hid · Σ_l L_Hid^(l)

Teacher states, importance weights and teacher units are computed under no_grad; the student's
units are pooled with the teacher's weights (default). The projectors W_l live on the student module
(``mta_projectors``) so that DDP/FSDP synchronise them and checkpoints carry them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MTAConfig
from .functional import dsa_per_sequence, hid_per_sequence, importance_weights, pool_spans
from .layers import KeyLayer

PROJECTORS = "mta_projectors"  # attribute of the student holding the ModuleList of W_l


def _stack(states: tuple[torch.Tensor, ...], layers: list[int]) -> torch.Tensor:
    """The chosen layers' states ``[L,B,T,d]``, upcast from half precision for the geometry."""
    x = torch.stack([states[l] for l in layers])
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class MTALoss:
    def __init__(self, cfg: MTAConfig, key_layers: list[KeyLayer]):
        if not key_layers:
            raise ValueError("MTA needs at least one key layer")
        self.cfg = cfg
        self.key_layers = key_layers
        self.granularities = sorted({k.granularity for k in key_layers})

    def build_projectors(self, d_student: int, d_teacher: int) -> nn.ModuleList:
        """One Linear(d_S, d_T, bias=False) per key layer; identity-initialised when widths match
        (``projector_init: auto``), since a student selected from the teacher shares its basis."""
        projs = nn.ModuleList(nn.Linear(d_student, d_teacher, bias=False) for _ in self.key_layers)
        identity = self.cfg.projector_init == "identity" or (self.cfg.projector_init == "auto" and d_student == d_teacher)
        if identity:
            if d_student != d_teacher:
                raise ValueError(f"projector_init: identity needs equal widths, got {d_student} and {d_teacher}")
            for p in projs:
                nn.init.eye_(p.weight)
        return projs

    def _layer_spans(self, spans: dict[str, torch.Tensor]) -> torch.Tensor:
        """Membership ``[L, B, K, T]`` for each key layer, from the batch's word/phrase spans."""
        missing = [g for g in self.granularities if f"{g}_spans" not in spans]
        if missing:
            raise KeyError(f"batch lacks spans for {missing}; build the dataset with MTA enabled")
        if len(self.granularities) == 1:
            s = spans[f"{self.granularities[0]}_spans"]
            return s.unsqueeze(0).expand(len(self.key_layers), *s.shape)
        k = max(spans[f"{g}_spans"].shape[1] for g in self.granularities)
        padded = {g: F.pad(spans[f"{g}_spans"], (0, 0, 0, k - spans[f"{g}_spans"].shape[1])) for g in self.granularities}
        return torch.stack([padded[kl.granularity] for kl in self.key_layers])

    def __call__(
        self,
        student_hidden: tuple[torch.Tensor, ...],
        teacher_hidden: tuple[torch.Tensor, ...],
        attention_mask: torch.Tensor,
        spans: dict[str, torch.Tensor],
        projectors: nn.ModuleList,
    ) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        mask = attention_mask.bool()
        hs = _stack(student_hidden, [k.student for k in self.key_layers])  # [L,B,T,d_S]
        members = self._layer_spans(spans)  # [L,B,K,T]
        with torch.no_grad():
            ht = _stack(teacher_hidden, [k.teacher for k in self.key_layers])  # [L,B,T,d_T]
            source = hs.detach() if cfg.weights == "student" else ht
            w = importance_weights(source, mask, uniform=cfg.weights == "uniform", center=cfg.center_states)  # [L,B,T]
        out = {}
        if cfg.lambda_dsa > 0:
            with torch.no_grad():
                units_t, span_w = pool_spans(ht, w, members, aggregation=cfg.span_aggregation)
            units_s, _ = pool_spans(hs, w, members, aggregation=cfg.span_aggregation)
            per_layer = dsa_per_sequence(
                units_s, units_t, span_w, members.any(-1), distance=cfg.distance, pairs=cfg.pairs
            ).mean(-1)
            out["dsa"] = per_layer.mean()  # mean over key layers
        if cfg.lambda_hid > 0:
            # each W_l through its module's forward, never by reading .weight: DeepSpeed ZeRO-3 gathers a sharded
            # weight only inside the forward of the module that owns it
            proj = torch.stack([p(h.to(p.weight.dtype)).to(hs.dtype) for p, h in zip(projectors, hs)])  # [L,B,T,d_T]
            out["hid"] = hid_per_sequence(proj, ht, w, members.any(-2)).mean(-1).sum()  # Σ over key layers
        return out

    def total(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.cfg.lambda_dsa * parts.get("dsa", 0.0) + self.cfg.lambda_hid * parts.get("hid", 0.0)
