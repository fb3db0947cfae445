"""FDD — feature dynamics distillation (Gong et al., ACL 2025, "Beyond Logits: Aligning Feature Dynamics
for Effective Knowledge Distillation").

A transformer is read as an ODE discretised on the layer index; the student (a coarser discretisation)
should follow the teacher's whole feature trajectory and its first-order derivative, not only its end
point. Features of different widths are compared as *intermediate predictions*: a block's hidden
state mapped through the model's own final norm and LM head (logit lens), z^l = W_U·norm(h^l).

    L_base = (1 − r)·CE + r·KD(z_T^{N_T}, z_S^{N_S})                              logit KD (r = kd_ratio)
           + w_layer · mean_{l ∈ P, l < N_S} KD(z_T^{φ(l)}, z_S^l)               layer-wise feature KD
           + w_delta · mean_{(a, b) consecutive in P} KD(z_T^{φ(b)} − z_T^{φ(a)}, z_S^b − z_S^a)   feature-delta KD

KD(z_T, z_S) is a token divergence between softmax(z_T/τ) and softmax(z_S/τ) (default: forward KL, the
original KD objective; ``options.divergence`` takes any registered token divergence), averaged over
response tokens. P are the student blocks of the trajectory; φ(l) = floor(l·N_T/N_S) their teacher
blocks. The last point is the models' actual output (logits), so the final-layer prediction KD *is*
the logit-KD term and is not counted twice.

Documented choices (the public description leaves them open; see docs/objectives.md):

- P = every student block 1..N_S (``options.layers: all``, the full discretised trajectory), or an
  explicit list of student blocks (the last block is always added); teacher blocks φ(l), or
  ``options.teacher_layers`` one per point.
- The delta of a layer pair is taken on the intermediate predictions (logits), and compared as the
  distributions softmax(Δz/τ) — the normalised likelihood ratio p^b/p^a of the two points.
- The embedding output (hidden_states[0]) is not a trajectory point.
- w_layer = w_delta = 1.
- Memory: each point's [N_response, V] projections are recomputed in the backward pass
  (``options.checkpoint``, default on) so only one pair is alive at a time.

``options.variant: reference`` follows instead the public FDD code of the DistiLLM lineage (the
``get_fdd_loss`` of ``fdd_finetune.py``; docs/objectives.md lists the differences and the sources):

    L_base = (1 − r)·CE + r·( KD(z_T^{N_T}, z_S^{N_S})
                              + w_layer · mean_{l ∈ P} KL(softmax(z_T^{φ(l)}/2) ‖ softmax(z_S^l/2))
                              + w_delta · mean_{(a, b) consecutive in P} [1 − cos(Δℓ_S, Δℓ_T)] )

with z^l = W_U·h^l (LM head, *no* final norm; OPT's ``project_out`` when present), ℓ^l = log_softmax(z^l)
at temperature 1, Δℓ = ℓ^b − ℓ^a, the temperature 2 fixed (no τ² factor), P exactly the listed points
(the last block is not added; at least two), every point in the layer term, and the FDD terms averaged
over every non-padding position that predicts a next token (prompt included), as the public code's
``attention_mask``. The logit term KD stays ``options.divergence`` at ``objective.temperature``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from ..models import unwrap
from .base import Objective, TokenDivergence, _upcast, register, response_positions, shared_rows


class FDDOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    divergence: str = Field("fkl", description="registered token divergence used for every KD term")
    layers: Literal["all"] | list[int] = Field("all", description="student blocks of the trajectory (1-based)")
    teacher_layers: list[int] | None = Field(None, description="teacher block per point (default φ(l))")
    layer_weight: float = Field(1.0, ge=0)
    delta_weight: float = Field(1.0, ge=0)
    checkpoint: bool = Field(True, description="recompute the per-point projections in backward (saves memory)")
    variant: Literal["paper", "reference"] = Field(
        "paper", description="paper: the published description (final norm + LM head, KD of deltas, τ); reference: "
        "the public code (LM head without the final norm, τ 2, 1 − cos of Δ log-probabilities, the listed layers "
        "only, FDD terms scaled by kd_ratio, all non-padding positions); see docs/objectives.md",
    )

    @field_validator("divergence")
    @classmethod
    def _token_divergence(cls, v):
        from .base import OBJECTIVES

        allowed = sorted(n for n, c in OBJECTIVES.items() if issubclass(c, TokenDivergence))
        if v not in allowed:
            raise ValueError(f"{v!r} is not a token divergence; allowed: {', '.join(allowed)}")
        return v

    @field_validator("layers")
    @classmethod
    def _layers(cls, v):
        if isinstance(v, list) and (not v or any(l < 1 for l in v) or v != sorted(set(v))):
            raise ValueError(f"layers must be distinct increasing 1-based block indices, got {v}")
        return v


def trajectory(opts: FDDOptions, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """(student block, teacher block) points of the trajectory, lowest first. ``paper``: the last is (N_S, N_T)
    (added when missing); ``reference``: exactly the listed points, at least two (one pair for the delta term)."""
    from ..errors import ConfigError

    students = list(range(1, n_student + 1)) if opts.layers == "all" else list(opts.layers)
    if students[-1] > n_student:
        raise ConfigError(f"fdd: options.layers {students} out of range for a {n_student}-block student")
    if opts.teacher_layers is not None:
        if len(opts.teacher_layers) != len(students):
            raise ConfigError(
                f"fdd: options.teacher_layers needs one teacher block per point of options.layers "
                f"({len(students)}), got {len(opts.teacher_layers)}"
            )
        teachers = list(opts.teacher_layers)
        if any(not 1 <= t <= n_teacher for t in teachers):
            raise ConfigError(f"fdd: options.teacher_layers {teachers} out of range 1..{n_teacher}")
    else:
        teachers = [l * n_teacher // n_student for l in students]
    points = list(zip(students, teachers))
    if opts.variant == "reference":
        if len(points) < 2:
            raise ConfigError(
                f"fdd: options.variant reference needs at least two trajectory points (the delta term compares "
                f"consecutive points), got options.layers {opts.layers} for a {n_student}-block student"
            )
        return points
    if points[-1][0] != n_student:
        points.append((n_student, n_teacher))
    elif points[-1][1] != n_teacher:
        raise ConfigError(f"fdd: the last student block must map to the last teacher block {n_teacher}")
    return points


# ------------------------------------------------------------------------------ functional core
def fdd_terms(s_points, t_points, s_maps, t_maps, divergence, *, temperature: float = 1.0, checkpoint: bool = False,
              variant: str = "paper", vocab: int | None = None):
    """Layer-wise and feature-delta terms along a trajectory of P points.

    ``s_points[i]`` / ``t_points[i]``: the student's / teacher's ``[N, ·]`` inputs of point i (hidden
    states, or logits for the last point); ``s_maps[i]`` / ``t_maps[i]`` turn them into ``[N, V]`` logits.
    ``divergence(s_logp, t_logp) -> [N]``. Returns (layer terms, delta terms for the P−1 consecutive
    pairs), each a token mean. ``paper``: layer terms for points 0..P−2 (the last is the logit KD), deltas
    D(softmax(Δz_T/τ), softmax(Δz_S/τ)). ``reference``: layer terms for all P points, deltas
    1 − cos(Δℓ_S, Δℓ_T) of the log-probabilities ℓ = log_softmax(z) at temperature 1.
    """
    p = len(s_points)
    reference = variant == "reference"

    def logp(z, v):
        return F.log_softmax(_upcast(z[:, :v]) / temperature, -1)

    def step(i, *tensors):
        zs, zt = s_maps[i](tensors[0]), t_maps[i](tensors[1])
        v = shared_rows(zs.shape[-1], zt.shape[-1], vocab=vocab)  # padded rows left out
        out = []
        if i < p - 1 or reference:
            out.append(divergence(logp(zs, v), logp(zt.detach(), v)).mean())
        if i > 0:
            zs_prev, zt_prev = s_maps[i - 1](tensors[2]), t_maps[i - 1](tensors[3])
            v = min(v, zs_prev.shape[-1], zt_prev.shape[-1])
            if reference:
                def lp(z):
                    return F.log_softmax(_upcast(z[:, :v]), -1)

                ds, dt = lp(zs) - lp(zs_prev), lp(zt) - lp(zt_prev)
                out.append((1 - F.cosine_similarity(ds, dt.detach(), dim=-1, eps=1e-5)).mean())
            else:
                ds, dt = _upcast(zs[:, :v]) - _upcast(zs_prev[:, :v]), _upcast(zt[:, :v]) - _upcast(zt_prev[:, :v])
                out.append(divergence(F.log_softmax(ds / temperature, -1), F.log_softmax(dt.detach() / temperature, -1)).mean())
        return tuple(out)

    layer, delta = [], []
    for i in range(p):
        args = (s_points[i], t_points[i]) + ((s_points[i - 1], t_points[i - 1]) if i > 0 else ())
        if checkpoint and torch.is_grad_enabled() and any(a.requires_grad for a in args):
            res = torch_checkpoint(step, i, *args, use_reentrant=False)
        else:
            res = step(i, *args)
        res = list(res)
        if i < p - 1 or reference:
            layer.append(res.pop(0))
        if i > 0:
            delta.append(res.pop(0))
    return layer, delta


# ----------------------------------------------------------------------------------- LM heads
_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")


def logit_lens(model: nn.Module, final_norm: bool = True):
    """h ↦ W_U·norm(h): a block's hidden state as next-token logits, through the model's final norm
    (and OPT's ``project_out``, if any) and LM head; ``final_norm=False``: h ↦ W_U·h (the public code)."""
    model = unwrap(model)
    head = model.get_output_embeddings()
    inner = model.base_model
    norm = project_out = None
    for holder in (inner, getattr(inner, "decoder", None)):
        if holder is None:
            continue
        for name in _NORM_NAMES:
            m = getattr(holder, name, None)
            if isinstance(m, nn.Module) and norm is None:
                norm = m
        if isinstance(getattr(holder, "project_out", None), nn.Module):
            project_out = holder.project_out
    if head is None or (final_norm and norm is None):
        raise ValueError(f"fdd: cannot find the final norm / LM head of {type(model).__name__}")

    def lens(h):
        h = norm(h) if final_norm else h
        return head(project_out(h) if project_out is not None else h)

    return lens


REFERENCE_TEMPERATURE = 2.0  # the public code's fixed temperature of the layer-wise term


def _identity(x):
    return x


@register("fdd")
class FDD(Objective):
    """FDD: logit KD + layer-wise KD of intermediate predictions + KD of their layer-to-layer deltas."""

    Options = FDDOptions
    needs_hidden_states = True
    needs_models = True

    def __init__(self, cfg):
        super().__init__(cfg)
        from .base import OBJECTIVES

        self.kd = OBJECTIVES[self.opts.divergence](cfg)
        self.fkl = OBJECTIVES["fkl"](cfg).divergence  # the reference variant's layer term
        self.points: list[tuple[int, int]] | None = None

    def set_vocabulary(self, n: int | None) -> None:
        super().set_vocabulary(n)
        self.kd.set_vocabulary(n)  # the logit KD's base

    def setup(self, run_cfg, tokenizer, student, teacher) -> None:
        self.points = trajectory(self.opts, student.config.num_hidden_layers, teacher.config.num_hidden_layers)

    def __call__(self, student_out, teacher_out, batch, student=None, teacher=None):
        labels = batch["labels"]
        # CE and the logit KD: chunked over response positions (objective.chunk_size) like the token divergences
        loss, ce, kd = self.kd.base_loss(student_out.logits, teacher_out.logits, labels)
        r = self.cfg.kd_ratio
        parts = {"ce": ce.detach(), "kd": kd.detach()}
        want = self.opts.layer_weight > 0 or self.opts.delta_weight > 0
        if want and student is not None and teacher is not None:
            hs_s, hs_t = student_out.hidden_states, teacher_out.hidden_states
            if self.points is None:
                self.points = trajectory(self.opts, len(hs_s) - 1, len(hs_t) - 1)
            reference = self.opts.variant == "reference"
            if reference:  # every non-padding position that predicts a next token, prompt included
                am = batch.get("attention_mask")
                am = torch.ones_like(labels, dtype=torch.bool) if am is None else am.bool()
                mask = am[:, :-1] & am[:, 1:]
            else:
                mask, _ = response_positions(labels)
            s_lens = logit_lens(student, final_norm=not reference)
            t_lens = logit_lens(teacher, final_norm=not reference)
            s_points, t_points, s_maps, t_maps = [], [], [], []
            for ls, lt in self.points:
                # the last hidden state HF returns is already normalised: its prediction is the logits
                s_last, t_last = ls == len(hs_s) - 1, lt == len(hs_t) - 1
                s_src = student_out.logits if s_last else hs_s[ls]
                t_src = teacher_out.logits if t_last else hs_t[lt]
                s_points.append(s_src[:, :-1][mask])
                t_points.append(t_src[:, :-1][mask].detach())
                s_maps.append(_identity if s_last else s_lens)
                t_maps.append(_identity if t_last else t_lens)
            if mask.any():
                layer, delta = fdd_terms(
                    s_points, t_points, s_maps, t_maps, self.fkl if reference else self.kd.divergence,
                    temperature=REFERENCE_TEMPERATURE if reference else self.cfg.temperature,
                    checkpoint=self.opts.checkpoint, variant=self.opts.variant, vocab=self.vocab,
                )
            else:
                layer = delta = []
            zero = student_out.logits.sum() * 0.0
            layer_kd = torch.stack(layer).mean() if layer else zero
            delta_kd = torch.stack(delta).mean() if delta else zero
            fdd = self.opts.layer_weight * layer_kd + self.opts.delta_weight * delta_kd
            loss = loss + (r * fdd if reference else fdd)
            parts.update(layer_kd=layer_kd.detach(), delta_kd=delta_kd.detach())
        return {"loss": loss, **parts}
