"""MTA as a plug-in loss: all key layers in one batched pass (MTA_SPEC §4–§7).

    L_MTA = λ_DSA · mean_l L_DSA^(l) + λ_Hid · Σ_l L_Hid^(l)

Teacher states, importance weights and teacher units are computed under no_grad; the student's
units are pooled with the teacher's weights (default; ``weights`` switches to student-side weights). The
projectors W_l live on the student module (``mta_projectors``) so that DDP/FSDP synchronise them and
checkpoints carry them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .functional import dsa_per_sequence, hid_per_sequence, importance_weights, pool_spans
from .layers import KeyLayer, hidden_widths

# `MTAConfig` in annotations is mtakd.config's; not imported, not even for type checking: the
# config validates against this module, which must not depend on it (tests/test_imports.py)

logger = logging.getLogger(__name__)

PROJECTORS = "mta_projectors"  # attribute of the student holding the ModuleList of W_l


def _stack(states: tuple[torch.Tensor, ...], layers: list[int]) -> torch.Tensor:
    """The chosen layers' states ``[L,B,T,d]``, upcast from half precision for the geometry."""
    x = torch.stack([states[l] for l in layers])
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def token_weights(cfg: MTAConfig, hs: torch.Tensor, ht: torch.Tensor, mask: torch.Tensor, *,
                  weights: str | None = None, teacher_weights: torch.Tensor | None = None):
    """(w, w_pool) ``[L,B,T]`` for ``mta.weights`` (or ``weights``), MTA_SPEC §4–§5: w pools the teacher's units and
    weighs w^sp and L_Hid, w_pool pools the student's units. ``teacher_weights``: the teacher's w, precomputed (a
    teacher cache). Call under no_grad."""
    mode = weights or cfg.weights
    kw = dict(center=cfg.center_states, sigma=cfg.sigma)
    w_student = importance_weights(hs.detach(), mask, **kw) if mode in ("student", "student_pooling") else None
    if mode == "student":
        w = w_student
    elif mode == "uniform":
        w = importance_weights(ht, mask, uniform=True, **kw)
    else:
        w = teacher_weights if teacher_weights is not None else importance_weights(ht, mask, **kw)
    return w, (w_student if w_student is not None else w)


class MTALoss:
    def __init__(self, cfg: MTAConfig, key_layers: list[KeyLayer]):
        if not key_layers:
            raise ValueError("MTA needs at least one key layer")
        self.cfg = cfg
        self.key_layers = key_layers
        self.granularities = sorted({k.granularity for k in key_layers})

    def build_projectors(
        self, d_student: int | Sequence[int], d_teacher: int | Sequence[int], *, from_teacher: bool,
        channels: Sequence[int] | None = None, teacher_maps: Sequence | None = None,
    ) -> nn.ModuleList:
        """The projectors W_l (MTA_SPEC §7): one ``Linear(d_S, d_T, bias=False)`` per key layer.

        Args:
            d_student, d_teacher: the widths of ``hidden_states[l]`` and ``hidden_states[φ(l)]`` per key layer
                (:func:`~mtakd.mta.layers.hidden_widths`), or one width for every layer.
            from_teacher: the student was built from the teacher's own blocks (``student.from_teacher``), so
                its hidden basis is the teacher's.
            channels: for a student pruned from the teacher's hidden channels (:mod:`mtakd.student`), the teacher
                channel each student channel was kept from (``config.mtakd_hidden_channels``).

        ``projector_init``: ``random`` (PyTorch's Linear init, the spec's default), ``identity`` (equal widths
        only), or ``auto``: identity for a layer whose widths match in a student built from the teacher,
        random otherwise; a separately pretrained student of equal width has a basis unrelated to the
        teacher's. ``selection`` (and ``auto`` for a student pruned from the teacher's hidden channels): the
        channel-selection map, W[channels[j], j] = 1 and 0 elsewhere, so W_l maps each student channel back to
        the teacher channel it came from (:func:`mtakd.models.selection_matrix`).

        ``teacher_maps``: per key layer, None where the teacher's state is in its residual basis, else the linear
        map ``[d_T, d_residual]`` from that basis to the state (OPT-350m's ``project_out`` at the top layer), or
        ``False`` where the state is projected but the map is unknown (the teacher is not loaded). A pruned
        student whose own state at that layer is in the pruned basis gets the map's kept columns,
        ``P[:, channels]``, under ``selection`` / ``auto``, or a random init when the map is unknown.
        """
        n = len(self.key_layers)
        ds = [d_student] * n if isinstance(d_student, int) else list(d_student)
        dt = [d_teacher] * n if isinstance(d_teacher, int) else list(d_teacher)
        if len(ds) != n or len(dt) != n:
            raise ValueError(f"build_projectors needs one width per key layer ({n}), got {ds} and {dt}")
        maps = list(teacher_maps) if teacher_maps is not None else [None] * n
        projs = nn.ModuleList()
        for key, a, b, m in zip(self.key_layers, ds, dt, maps):
            p = nn.Linear(a, b, bias=False)
            init = self._projector_init(key, a, b, from_teacher=from_teacher, channels=channels, teacher_map=m)
            if init == "projected":
                with torch.no_grad():
                    p.weight.copy_(m.detach().float()[:, list(channels)])
            elif init == "identity":
                nn.init.eye_(p.weight)
            elif init == "selection":
                from ..models import selection_matrix

                with torch.no_grad():
                    p.weight.copy_(selection_matrix(channels, b))
            projs.append(p)
        return projs

    def _projector_init(self, key: KeyLayer, d_student: int, d_teacher: int, *, from_teacher: bool,
                        channels: Sequence[int] | None = None, teacher_map=None) -> str:
        """``identity``, ``selection``, ``projected`` (the teacher map's kept columns) or ``random`` for one key
        layer's W_l, from ``projector_init`` and the layer's ``teacher_maps`` entry (see build_projectors)."""
        mode = self.cfg.projector_init
        # a state in the student's pruned basis against a projected teacher state: through the projection
        if (teacher_map is not None and channels is not None and len(channels) == d_student
                and mode in ("selection", "auto")):
            if teacher_map is not False:
                return "projected"
            logger.warning("MTA key layer %d→%d: the teacher's state is projected (e.g. OPT's project_out) and the "
                           "teacher is not loaded: its projector starts random", key.student, key.teacher)
            return "random"
        # the selection map applies to the states in the pruned residual basis (not, e.g., OPT's projected top state)
        pruned = channels is not None and len(channels) == d_student and max(channels) < d_teacher
        if mode == "selection" or (mode == "auto" and pruned):
            if pruned:
                return "selection"
            if channels is not None and d_student == d_teacher:
                return "identity"  # a state outside the pruned basis (OPT's project_out output): not pruned
            raise ValueError(
                f"mta.projector_init: selection needs a student pruned from the teacher's hidden channels "
                f"(student.from_teacher with hidden_size, or a directory `mtakd student` wrote); key layer "
                f"{key.student}→{key.teacher} maps width {d_student} to {d_teacher} and the student records "
                f"{'no' if channels is None else len(channels)} kept channels; use auto or random"
            )
        if mode == "auto":
            return "identity" if from_teacher and d_student == d_teacher else "random"
        if mode == "identity" and d_student != d_teacher:
            raise ValueError(
                f"mta.projector_init: identity needs equal widths, got student layer {key.student} of width "
                f"{d_student} and teacher layer {key.teacher} of width {d_teacher}; use auto or random"
            )
        return mode

    def projectors_for(self, student, teacher, *, from_teacher: bool,
                       teacher_widths: Sequence[int] | None = None, teacher_config=None) -> nn.ModuleList:
        """:meth:`build_projectors` sized from the hidden states the two models return (not their configs);
        the kept channels of a pruned student are read from its config (``mtakd_hidden_channels``).
        ``teacher_widths`` and ``teacher_config``: the teacher's widths per key layer and its config when the
        teacher is not loaded (a teacher cache)."""
        from ..models import hidden_channels, output_projection

        d_s = hidden_widths(student, [k.student for k in self.key_layers])
        d_t = list(teacher_widths) if teacher_widths is not None else hidden_widths(
            teacher, [k.teacher for k in self.key_layers])
        top = output_projection(teacher, teacher_config)  # the map to the teacher's top state, if projected
        maps = None
        if top is not None:
            n_teacher = (teacher.config if teacher is not None else teacher_config).num_hidden_layers
            maps = [top if k.teacher == n_teacher else None for k in self.key_layers]
        return self.build_projectors(d_s, d_t, from_teacher=from_teacher, channels=hidden_channels(student),
                                     teacher_maps=maps)

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
        teacher_weights: torch.Tensor | None = None,
        teacher_attention_mask: torch.Tensor | None = None,
        teacher_spans: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``teacher_weights``: the teacher's w_t ``[L, B, T]`` per key layer, precomputed by
        :meth:`teacher_importance` (read from a teacher cache); None computes them from ``teacher_hidden``.

        ``teacher_attention_mask`` ``[B, T_T]`` and ``teacher_spans`` (the teacher's own ``word_spans`` /
        ``phrase_spans`` ``[B, K, T_T]``): the teacher tokenised the text with its own tokenizer
        (``objective.cross_tokenizer``). Unit k of both sides is the same character span; each model pools its own
        tokens of a unit with its own importance weights (``weights: uniform``: uniformly), the span weights w^sp
        are the teacher's (``weights: student``: the student's), and L_Hid is unit-level (docs/method.md).

        Precision: computed with autocast off (``training.bf16`` / ``fp16`` runs the models under autocast), on states
        upcast to float32, with float32 projectors: the cosines, normalisations, attention scores of the importance
        weights and the projections are float32 whatever the models' precision (docs/scaling.md, "bf16")."""
        with torch.autocast(attention_mask.device.type, enabled=False):
            return self._terms(student_hidden, teacher_hidden, attention_mask, spans, projectors, teacher_weights,
                               teacher_attention_mask, teacher_spans)

    def _terms(self, student_hidden, teacher_hidden, attention_mask, spans, projectors, teacher_weights,
               teacher_attention_mask, teacher_spans) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        mask = attention_mask.bool()
        members = self._layer_spans(spans)  # [L,B,K,T]
        cross = None
        if teacher_spans is not None:
            cross = (teacher_attention_mask.bool(), self._layer_spans(teacher_spans))  # [B,T_T], [L,B,K,T_T]
            if cross[1].shape[-2] != members.shape[-2]:
                raise ValueError(f"the teacher's batch holds {cross[1].shape[-2]} units per sequence and the "
                                 f"student's {members.shape[-2]}: unit k must be the same span on both sides")
        if cfg.lambda_hid > 0:
            self._check_projectors(student_hidden, teacher_hidden, projectors)
        # key layers are stacked by equal (d_S, d_T): one group for most pairs; OPT with project_out returns a
        # narrower top state (see hidden_widths), which forms a group of its own
        groups: dict[tuple[int, int], list[int]] = {}
        for i, k in enumerate(self.key_layers):
            widths = (student_hidden[k.student].shape[-1], teacher_hidden[k.teacher].shape[-1])
            groups.setdefault(widths, []).append(i)
        dsa, hid = [], []
        for idx in groups.values():
            w_t = teacher_weights[idx] if teacher_weights is not None else None
            t_side = None if cross is None else (cross[0], cross[1][idx])
            d, h = self._group(idx, student_hidden, teacher_hidden, mask, members[idx], projectors, w_t, t_side)
            dsa.append(d)
            hid.append(h)
        out = {}
        if cfg.lambda_dsa > 0:
            out["dsa"] = torch.cat(dsa).mean()  # mean over key layers
        if cfg.lambda_hid > 0:
            out["hid"] = torch.cat(hid).sum()  # Σ over key layers
        return out

    def _check_projectors(self, student_hidden, teacher_hidden, projectors) -> None:
        if projectors is None or len(projectors) != len(self.key_layers):
            raise ValueError(
                f"L_Hid needs one projector per key layer ({len(self.key_layers)}), got "
                f"{None if projectors is None else len(projectors)}"
            )
        for k, p in zip(self.key_layers, projectors):
            got = (student_hidden[k.student].shape[-1], teacher_hidden[k.teacher].shape[-1])
            if (p.in_features, p.out_features) != got:
                raise ValueError(
                    f"projector of key layer {k.student}→{k.teacher} maps {p.in_features}→{p.out_features}, but "
                    f"hidden_states[{k.student}] / [{k.teacher}] are {got[0]} / {got[1]} wide; build the projectors "
                    "from the widths the models return (MTALoss.projectors_for)"
                )

    def teacher_importance(self, teacher_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The teacher's token importance w_t (MTA_SPEC §4) of teacher states ``[..., B, T, d]`` with the run's
        switches (``center_states``, ``sigma``): what the loss computes, and what a teacher cache stores."""
        return importance_weights(teacher_states, mask, center=self.cfg.center_states, sigma=self.cfg.sigma)

    def _group(self, idx, student_hidden, teacher_hidden, mask, members, projectors, teacher_weights=None,
               teacher_side=None):
        """Per-layer (L_DSA, L_Hid), each ``[len(idx)]``, for key layers ``idx`` of equal widths (MTA_SPEC §4–§7).
        ``teacher_side``: (mask ``[B,T_T]``, membership ``[L,B,K,T_T]``) of the teacher's own tokenisation."""
        if teacher_side is not None:
            return self._cross_group(idx, student_hidden, teacher_hidden, mask, members, projectors, *teacher_side)
        cfg = self.cfg
        keys = [self.key_layers[i] for i in idx]
        hs = _stack(student_hidden, [k.student for k in keys])  # [L,B,T,d_S]
        with torch.no_grad():
            ht = _stack(teacher_hidden, [k.teacher for k in keys])  # [L,B,T,d_T]
            w, w_pool = token_weights(cfg, hs, ht, mask, teacher_weights=teacher_weights)  # [L,B,T]
        dsa = hid = None
        unit_hid = cfg.lambda_hid > 0 and cfg.hid_level == "unit"
        if cfg.lambda_dsa > 0 or unit_hid:
            with torch.no_grad():
                units_t, span_w = pool_spans(ht, w, members, aggregation=cfg.span_aggregation)
            units_s, _ = pool_spans(hs, w_pool, members, aggregation=cfg.span_aggregation)
            dsa, hid = self._unit_terms(idx, units_s, units_t, span_w, members.any(-1), projectors, hid=unit_hid)
        if cfg.lambda_hid > 0 and not unit_hid:
            if ht.shape[-2] != hs.shape[-2]:
                raise ValueError("teacher and student states have different lengths: token-level L_Hid needs one "
                                 "tokenisation (objective.cross_tokenizer needs objective.mta.hid_level: unit)")
            # each W_l through its module's forward, never by reading .weight: DeepSpeed ZeRO-3 gathers a sharded
            # weight only inside the forward of the module that owns it
            proj = torch.stack([projectors[i](h.to(projectors[i].weight.dtype)).to(hs.dtype)
                                for i, h in zip(idx, hs)])
            hid = hid_per_sequence(proj, ht, w, members.any(-2)).mean(-1)  # [L,B,T,d_T] → [L]
        return dsa, hid

    def _cross_group(self, idx, student_hidden, teacher_hidden, mask, members, projectors, t_mask, t_members):
        """:meth:`_group` when the teacher tokenised the text itself: unit k is the same character span in both
        tokenisations, so only units are compared (L_DSA, unit-level L_Hid). Each side pools its own tokens of a
        unit with its own w (MTA_SPEC §4–§5; ``uniform``: 1/N); w^sp is the teacher's, or the student's with
        ``weights: student`` — the teacher's w is mapped to the student by unit, never by token."""
        cfg = self.cfg
        keys = [self.key_layers[i] for i in idx]
        hs = _stack(student_hidden, [k.student for k in keys])  # [L,B,T_S,d_S]
        kw = dict(center=cfg.center_states, sigma=cfg.sigma, uniform=cfg.weights == "uniform")
        with torch.no_grad():
            ht = _stack(teacher_hidden, [k.teacher for k in keys])  # [L,B,T_T,d_T]
            w_s = importance_weights(hs.detach(), mask, **kw)
            w_t = importance_weights(ht, t_mask, **kw)
            units_t, span_w = pool_spans(ht, w_t, t_members, aggregation=cfg.span_aggregation)
        units_s, span_w_s = pool_spans(hs, w_s, members, aggregation=cfg.span_aggregation)
        if cfg.weights == "student":
            span_w = span_w_s.detach()
        real = members.any(-1) & t_members.any(-1)
        if cfg.lambda_hid > 0 and cfg.hid_level != "unit":
            raise ValueError("objective.cross_tokenizer needs objective.mta.hid_level: unit (token-level L_Hid "
                             "compares aligned tokens)")
        return self._unit_terms(idx, units_s, units_t, span_w, real, projectors, hid=cfg.lambda_hid > 0)

    def _unit_terms(self, idx, units_s, units_t, span_w, real, projectors, hid: bool):
        """(L_DSA, L_Hid) per layer ``[len(idx)]`` from pooled units ``[L,B,K,d]``: the spec's DSA (§6) and the
        unit-level L_Hid Σ_k w^sp_k (1 − cos(W_l U^S_k, U^T_k)) (docs/method.md, ``hid_level: unit``)."""
        cfg = self.cfg
        dsa = hid_l = None
        if cfg.lambda_dsa > 0:
            dsa = dsa_per_sequence(units_s, units_t, span_w, real, distance=cfg.distance, pairs=cfg.pairs).mean(-1)
        if hid:
            # W_l is linear without bias: projecting the pooled unit equals pooling the projected tokens
            proj = torch.stack([projectors[i](u.to(projectors[i].weight.dtype)).to(units_s.dtype)
                                for i, u in zip(idx, units_s)])
            hid_l = hid_per_sequence(proj, units_t, span_w, real).mean(-1)
        return dsa, hid_l

    def total(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.cfg.lambda_dsa * parts.get("dsa", 0.0) + self.cfg.lambda_hid * parts.get("hid", 0.0)
