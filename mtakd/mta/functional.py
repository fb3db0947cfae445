"""MTA's equations as pure, batched torch functions (MTA_SPEC §4–§7).

Shapes: ``B`` sequences, ``T`` positions, ``K`` spans, ``d`` hidden width. Every function also
accepts extra *leading* dimensions (e.g. a stack of ``L`` key layers: ``hidden [L,B,T,d]``,
``spans [L,B,K,T]`` or ``[B,K,T]``), so all key layers are processed in one call. Masks are bool,
True = real token / real span. Nothing here loops over tokens, spans or sequences.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_EPS = 1e-8


def importance_weights(
    hidden: torch.Tensor, mask: torch.Tensor, *, uniform: bool = False, center: bool = False, sigma: str = "std"
) -> torch.Tensor:
    """Token importance w_t (MTA_SPEC §4): the attention each token *receives*, bidirectional, no self-loops.

        Ĥ_t = H_t / σ(H_t)              σ: population std over the hidden dim, H not centred (default)
        S_{s→t} = Ĥ_s·Ĥ_t / √d + M_{s,t}   M = −∞ on the diagonal and on padding
        α_{s→t} = softmax_t S_{s→t}
        w_t = (1/N) Σ_s α_{s→t}

    Args:
        hidden: teacher states ``[..., B, T, d]`` at the mapped teacher layer (call under no_grad).
        mask: ``[B, T]`` (or broadcastable) bool, True for real tokens.
        uniform: the "w/o weight" ablation, w_t = 1/N.
        center: subtract each token's mean over the hidden dim before dividing by σ (a LayerNorm without
            affine); the spec's default is no mean subtraction.
        sigma: "std" (default), σ = sqrt(mean_i (H_ti − mean(H_t))²), the population std; or "rms",
            σ = sqrt(mean_i H_ti²), the root mean square (an RMSNorm without weight). The spec (§4) says
            "std" and leaves open which; with ``center`` both are the same.
    Returns:
        ``[..., B, T]``: zero at padding, summing to 1 over each sequence's real tokens. A sequence with a
        single real token gives it weight 1 (there is no other token to receive attention from).
    """
    mask = mask.bool()
    n = mask.sum(-1, keepdim=True).to(hidden.dtype)  # [B,1]
    if uniform:
        return (mask.to(hidden.dtype) / n.clamp_min(1)).expand(hidden.shape[:-1])
    d = hidden.shape[-1]
    if center:
        hidden = hidden - hidden.mean(-1, keepdim=True)
    if sigma == "std":
        scale = hidden.std(-1, correction=0, keepdim=True)
    elif sigma == "rms":
        scale = hidden.square().mean(-1, keepdim=True).sqrt()
    else:
        raise ValueError(f"sigma must be 'std' or 'rms', got {sigma!r}")
    h = hidden / scale.clamp_min(_EPS)
    scores = h @ h.transpose(-1, -2) / math.sqrt(d)  # [..., B, T(s), T(t)]
    eye = torch.eye(mask.shape[-1], dtype=torch.bool, device=mask.device)
    allowed = mask[..., :, None] & mask[..., None, :] & ~eye
    alpha = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    alpha = alpha.masked_fill(~allowed, 0.0)  # rows with no allowed target (padding, N=1) are 0, not NaN
    w = alpha.sum(-2) / n.clamp_min(1)  # mean over source tokens s (padding rows are 0)
    single = (n == 1) & mask  # N = 1: the lone token gets all the weight
    return torch.where(single, torch.ones_like(w), w)


def pool_spans(
    hidden: torch.Tensor, weights: torch.Tensor, spans: torch.Tensor, *, aggregation: str = "sum"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Span units and span weights (MTA_SPEC §5).

        U_k   = Σ_{t∈S_k} w_t H_t / Σ_{t∈S_k} w_t       importance-weighted mean of the span's tokens
        w̃_k  = Σ_{t∈S_k} w_t   (aggregation "sum", default; "mean": divided by |S_k|)
        w^sp_k = w̃_k / Σ_j w̃_j                          over the sequence's real spans

    Args:
        hidden: ``[..., B, T, d]`` (student states at l, or teacher states at φ(l)).
        weights: ``[..., B, T]`` token weights (the teacher's w by default for both sides).
        spans: ``[..., B, K, T]`` 0/1 membership; a span with no member is padding.
    Returns:
        ``units [..., B, K, d]`` (0 for padded spans) and ``span_weights [..., B, K]`` (0 for padded spans).
    """
    member = spans.to(hidden.dtype)
    m = member * weights.to(hidden.dtype)[..., None, :]  # [..., B, K, T]
    mass = m.sum(-1)  # w̃_k
    units = (m @ hidden) / mass.clamp_min(_EPS)[..., None]
    if aggregation == "mean":
        mass = mass / member.sum(-1).clamp_min(1)
    elif aggregation != "sum":
        raise ValueError(f"aggregation must be 'sum' or 'mean', got {aggregation!r}")
    span_weights = mass / mass.sum(-1, keepdim=True).clamp_min(_EPS)
    return units, span_weights


def unit_distances(units: torch.Tensor, *, distance: str = "cosine") -> torch.Tensor:
    """Pairwise distances ``[..., K, K]`` between units (MTA_SPEC §6).

    "cosine": d = 1 − cos (default). "normalized_euclidean": squared Euclidean distance of the
    L2-normalised vectors, which equals 2·(1 − cos).
    """
    u = F.normalize(units, dim=-1, eps=_EPS)
    cos = u @ u.transpose(-1, -2)
    if distance == "cosine":
        return 1.0 - cos
    if distance == "normalized_euclidean":
        return 2.0 - 2.0 * cos
    raise ValueError(f"distance must be 'cosine' or 'normalized_euclidean', got {distance!r}")


def dsa_per_sequence(
    units_s: torch.Tensor,
    units_t: torch.Tensor,
    span_weights: torch.Tensor,
    span_mask: torch.Tensor,
    *,
    distance: str = "cosine",
    pairs: str = "all",
) -> torch.Tensor:
    """L_DSA of each sequence ``[..., B]``: Σ_i Σ_{j≠i} w^sp_i w^sp_j (d(U^S_i,U^S_j) − d(U^T_i,U^T_j))²."""
    diff = unit_distances(units_s, distance=distance) - unit_distances(units_t, distance=distance)
    k = span_mask.shape[-1]
    if pairs == "all":
        pair = ~torch.eye(k, dtype=torch.bool, device=span_mask.device)
    elif pairs == "upper":
        pair = torch.ones(k, k, dtype=torch.bool, device=span_mask.device).triu(1)
    else:
        raise ValueError(f"pairs must be 'all' or 'upper', got {pairs!r}")
    valid = span_mask[..., :, None] & span_mask[..., None, :] & pair
    ww = span_weights[..., :, None] * span_weights[..., None, :]
    return (ww * diff.square()).masked_fill(~valid, 0.0).sum((-1, -2))


def dsa_loss(
    units_s: torch.Tensor,
    units_t: torch.Tensor,
    span_weights: torch.Tensor,
    span_mask: torch.Tensor,
    *,
    distance: str = "cosine",
    pairs: str = "all",
) -> torch.Tensor:
    """Dynamic Structural Alignment (MTA_SPEC §6), a scalar.

        L_DSA^(l) = Σ_i Σ_{j≠i} w^sp_i w^sp_j · (d(U^S_i, U^S_j) − d(U^T_i, U^T_j))²

    summed per sequence, averaged over the batch; with leading layer dimensions, also averaged over
    layers (L_DSA = mean over key layers). No projector: distances do not depend on the width.

    Args:
        units_s, units_t: ``[..., B, K, d_S]`` and ``[..., B, K, d_T]``.
        span_weights: ``[..., B, K]`` w^sp (the teacher's).
        span_mask: ``[..., B, K]`` bool, True for real spans.
        distance: "cosine" (default) or "normalized_euclidean". pairs: "all" (j≠i, default) or "upper" (i<j).
    """
    return dsa_per_sequence(units_s, units_t, span_weights, span_mask, distance=distance, pairs=pairs).mean()


def hid_per_sequence(
    student_proj: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, covered: torch.Tensor
) -> torch.Tensor:
    """L_Hid of each sequence ``[..., B]``: Σ_{t∈M} w_t (1 − cos(H̃^S_t, H^T_t))."""
    cos = F.cosine_similarity(student_proj, teacher, dim=-1, eps=_EPS)
    return (weights * (1.0 - cos)).masked_fill(~covered.bool(), 0.0).sum(-1)


def hid_loss(
    student_proj: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, covered: torch.Tensor
) -> torch.Tensor:
    """Hidden Representation Alignment (MTA_SPEC §7) for one layer, a scalar.

        L_Hid^(l) = Σ_{t∈M_l} w_t · (1 − cos(H̃^S_t, H^T_t)),   H̃^S_t = H^S_t W_l

    summed per sequence, averaged over the batch; with leading layer dimensions, summed over layers
    (L_Hid = Σ over key layers, the spec's default).

    Args:
        student_proj: projected student states ``[..., B, T, d_T]``.
        teacher: teacher states ``[..., B, T, d_T]``.
        weights: ``[..., B, T]`` teacher importance weights.
        covered: ``[..., B, T]`` bool, tokens covered by the layer's spans (M_l).
    """
    per_seq = hid_per_sequence(student_proj, teacher, weights, covered)
    return per_seq.mean(-1).sum()
