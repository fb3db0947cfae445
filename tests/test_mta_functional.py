"""Tests for mtakd.mta.functional against a naive, loop-based reference written from MTA_SPEC §4–§7.

Everything runs in float64 on random inputs with padding (different real lengths per sequence, right
padding, plus one left-padded case). The reference only ever sees each sequence's real tokens.
"""

from __future__ import annotations

import math

import pytest
import torch

from mtakd.mta.functional import (
    dsa_loss,
    dsa_per_sequence,
    hid_loss,
    hid_per_sequence,
    importance_weights,
    pool_spans,
    unit_distances,
)

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Naive reference (spec §4–§7), loops over sequences / spans / pairs / tokens, real tokens only.
# ----------------------------------------------------------------------------------------------


def ref_importance_one(H: torch.Tensor, sigma: str = "std") -> torch.Tensor:
    """w for one sequence's real tokens H [N, d] (spec §4); σ the population std, or the root mean square."""
    N, d = H.shape
    if N == 1:
        return torch.ones(1, dtype=H.dtype)
    Hhat = torch.empty_like(H)
    for t in range(N):
        if sigma == "std":
            mu = sum(float(x) for x in H[t]) / d
            scale = math.sqrt(sum((float(x) - mu) ** 2 for x in H[t]) / d)  # population std, H itself not centred
        else:
            scale = math.sqrt(sum(float(x) ** 2 for x in H[t]) / d)  # root mean square
        Hhat[t] = H[t] / scale
    S = torch.empty(N, N, dtype=H.dtype)
    for s in range(N):
        for t in range(N):
            S[s, t] = -math.inf if s == t else float(Hhat[s] @ Hhat[t]) / math.sqrt(d)
    alpha = torch.zeros(N, N, dtype=H.dtype)
    for s in range(N):
        row_max = max(float(S[s, t]) for t in range(N) if t != s)
        ex = [0.0 if t == s else math.exp(float(S[s, t]) - row_max) for t in range(N)]
        z = sum(ex)
        for t in range(N):
            alpha[s, t] = ex[t] / z
    w = torch.zeros(N, dtype=H.dtype)
    for t in range(N):
        w[t] = sum(float(alpha[s, t]) for s in range(N)) / N
    return w


def real_positions(mask_row: torch.Tensor) -> list[int]:
    return [i for i in range(mask_row.shape[0]) if bool(mask_row[i])]


def ref_importance(hidden: torch.Tensor, mask: torch.Tensor, uniform: bool = False, sigma: str = "std") -> torch.Tensor:
    """[B, T] weights, 0 at padding, computed per sequence on its real tokens only."""
    B, T, _ = hidden.shape
    out = torch.zeros(B, T, dtype=hidden.dtype)
    for b in range(B):
        pos = real_positions(mask[b])
        if not pos:
            continue
        if uniform:
            w = torch.full((len(pos),), 1.0 / len(pos), dtype=hidden.dtype)
        else:
            w = ref_importance_one(hidden[b, pos], sigma)
        for i, p in enumerate(pos):
            out[b, p] = w[i]
    return out


def span_members(spans: torch.Tensor, b: int) -> list[tuple[int, list[int]]]:
    """[(k, [positions])] for the real (non-empty) spans of sequence b."""
    res = []
    for k in range(spans.shape[1]):
        mem = [t for t in range(spans.shape[2]) if spans[b, k, t] > 0]
        if mem:
            res.append((k, mem))
    return res


def ref_pool(hidden, weights, spans, aggregation="sum"):
    """{(b, k): U_k} and {(b, k): w^sp_k} for real spans (spec §5)."""
    units, sw = {}, {}
    B = hidden.shape[0]
    for b in range(B):
        mass = {}
        for k, mem in span_members(spans, b):
            num = torch.zeros(hidden.shape[-1], dtype=hidden.dtype)
            den = 0.0
            for t in mem:
                num = num + weights[b, t] * hidden[b, t]
                den += float(weights[b, t])
            units[(b, k)] = num / den
            mass[k] = den if aggregation == "sum" else den / len(mem)
        total = sum(mass.values())
        for k, m in mass.items():
            sw[(b, k)] = m / total
    return units, sw


def ref_cos(u, v):
    return float(u @ v) / (math.sqrt(float(u @ u)) * math.sqrt(float(v @ v)))


def ref_dist(u, v, distance):
    if distance == "cosine":
        return 1.0 - ref_cos(u, v)
    un = u / math.sqrt(float(u @ u))
    vn = v / math.sqrt(float(v @ v))
    return float(((un - vn) ** 2).sum())


def ref_dsa(units_s, units_t, sw, B, distance="cosine", pairs="all"):
    """Per-sequence L_DSA list (spec §6), from dicts keyed by (b, k)."""
    per_seq = []
    for b in range(B):
        ks = sorted(k for (bb, k) in sw if bb == b)
        total = 0.0
        for i in ks:
            for j in ks:
                if i == j or (pairs == "upper" and not i < j):
                    continue
                ds = ref_dist(units_s[(b, i)], units_s[(b, j)], distance)
                dt = ref_dist(units_t[(b, i)], units_t[(b, j)], distance)
                total += sw[(b, i)] * sw[(b, j)] * (ds - dt) ** 2
        per_seq.append(total)
    return per_seq


def ref_hid(student_proj, teacher, weights, covered):
    """Per-sequence L_Hid list (spec §7) by a loop over covered tokens."""
    per_seq = []
    for b in range(student_proj.shape[0]):
        total = 0.0
        for t in range(student_proj.shape[1]):
            if covered[b, t]:
                total += float(weights[b, t]) * (1.0 - ref_cos(student_proj[b, t], teacher[b, t]))
        per_seq.append(total)
    return per_seq


# ----------------------------------------------------------------------------------------------
# Random padded batches
# ----------------------------------------------------------------------------------------------


def make_spans(gen, pos: list[int], T: int, K: int, insert_empty_at: int | None = None) -> torch.Tensor:
    """[K, T] spans over the real positions: contiguous runs of 1–4 tokens, some gaps, a forced
    length-1 span, remaining rows zero (padded spans); optionally an empty row in the middle."""
    rows = []
    i = 0
    first = True
    while i < len(pos) and len(rows) < K - 1:
        if torch.rand(1, generator=gen).item() < 0.2 and not first:
            i += 1  # uncovered token
            continue
        length = 1 if first else int(torch.randint(1, 5, (1,), generator=gen))
        first = False
        run = pos[i : i + length]
        r = torch.zeros(T, dtype=DT)
        r[run] = 1.0
        rows.append(r)
        i += length
    if insert_empty_at is not None and len(rows) > insert_empty_at:
        rows.insert(insert_empty_at, torch.zeros(T, dtype=DT))
    rows = rows[:K]
    while len(rows) < K:
        rows.append(torch.zeros(T, dtype=DT))
    return torch.stack(rows)


def make_batch(seed=0, lengths=(7, 1, 12, 2, 9), T=14, K=8, dt=6, ds=5, left=False, garbage=3.0):
    """Teacher [B,T,dt], student [B,T,ds], mask [B,T], spans [B,K,T] (float 0/1), right or left padded.
    Padding positions hold large garbage values (finite)."""
    gen = torch.Generator().manual_seed(seed)
    B = len(lengths)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if left:
            mask[b, T - n :] = True
        else:
            mask[b, :n] = True
    # non-zero token means so that the "no mean subtraction" choice matters
    teacher = torch.randn(B, T, dt, generator=gen, dtype=DT) + 0.7 * torch.randn(B, T, 1, generator=gen, dtype=DT)
    student = torch.randn(B, T, ds, generator=gen, dtype=DT) + 0.5
    pad = ~mask
    teacher[pad] = garbage * torch.randn(int(pad.sum()), dt, generator=gen, dtype=DT) + 100.0
    student[pad] = garbage * torch.randn(int(pad.sum()), ds, generator=gen, dtype=DT) - 50.0
    spans = torch.stack(
        [
            make_spans(gen, real_positions(mask[b]), T, K, insert_empty_at=1 if b == 2 else None)
            for b in range(B)
        ]
    )
    return teacher, student, mask, spans


def span_mask_of(spans):
    return spans.sum(-1) > 0


@pytest.fixture(scope="module")
def batch():
    return make_batch()


# ----------------------------------------------------------------------------------------------
# 1. Agreement with the reference
# ----------------------------------------------------------------------------------------------


def test_batch_has_the_intended_structure(batch):
    _, _, mask, spans = batch
    lens = spans.sum(-1)
    assert (lens == 1).any(), "need length-1 spans"
    assert (lens == 0).any(), "need padded spans"
    assert (span_mask_of(spans)[2, 2:]).any() and not span_mask_of(spans)[2, 1], "padded span in the middle"
    assert (mask.sum(-1) == 1).any() and (mask.sum(-1) == 2).any()
    # spans never touch padding
    assert not (spans.bool() & ~mask[:, None, :]).any()


@pytest.mark.parametrize("left", [False, True])
def test_importance_weights_match_reference(left):
    teacher, _, mask, _ = make_batch(seed=1, left=left)
    w = importance_weights(teacher, mask)
    torch.testing.assert_close(w, ref_importance(teacher, mask), **TOL)


@pytest.mark.parametrize("left", [False, True])
def test_rms_importance_weights_match_reference(left):
    teacher, _, mask, _ = make_batch(seed=1, left=left)
    w = importance_weights(teacher, mask, sigma="rms")
    torch.testing.assert_close(w, ref_importance(teacher, mask, sigma="rms"), **TOL)
    # the tokens have non-zero means (make_batch), so the two readings of σ differ
    assert (w - importance_weights(teacher, mask)).abs().max() > 1e-3
    # centred, the mean square about 0 is the variance: rms and std agree
    torch.testing.assert_close(importance_weights(teacher, mask, sigma="rms", center=True),
                               importance_weights(teacher, mask, center=True), **TOL)
    with pytest.raises(ValueError, match="sigma"):
        importance_weights(teacher, mask, sigma="var")


def test_uniform_importance_weights_match_reference(batch):
    teacher, _, mask, _ = batch
    w = importance_weights(teacher, mask, uniform=True)
    torch.testing.assert_close(w, ref_importance(teacher, mask, uniform=True), **TOL)
    n = mask.sum(-1, keepdim=True).to(DT)
    torch.testing.assert_close(w, mask.to(DT) / n, **TOL)


@pytest.mark.parametrize("aggregation", ["sum", "mean"])
@pytest.mark.parametrize("left", [False, True])
def test_pool_spans_match_reference(aggregation, left):
    teacher, student, mask, spans = make_batch(seed=2, left=left)
    w = importance_weights(teacher, mask)
    sm = span_mask_of(spans)
    for hidden in (teacher, student):  # student pooled with the teacher's weights
        units, sw = pool_spans(hidden, w, spans, aggregation=aggregation)
        ref_u, ref_sw = ref_pool(hidden, w, spans, aggregation)
        assert set(ref_u) == {(b, k) for b, k in sm.nonzero().tolist()}
        for (b, k), u in ref_u.items():
            torch.testing.assert_close(units[b, k], u, **TOL)
            torch.testing.assert_close(sw[b, k].item(), ref_sw[(b, k)], **TOL)
        assert (sw[~sm] == 0).all()
        assert (units[~sm] == 0).all()
        torch.testing.assert_close(sw.sum(-1), torch.ones(len(mask), dtype=DT), **TOL)


def test_pool_spans_mean_differs_from_sum(batch):
    teacher, _, mask, spans = batch
    w = importance_weights(teacher, mask)
    _, s1 = pool_spans(teacher, w, spans, aggregation="sum")
    _, s2 = pool_spans(teacher, w, spans, aggregation="mean")
    assert (s1 - s2).abs().max() > 1e-3


@pytest.mark.parametrize("distance", ["cosine", "normalized_euclidean"])
@pytest.mark.parametrize("pairs", ["all", "upper"])
@pytest.mark.parametrize("left", [False, True])
def test_dsa_matches_reference(distance, pairs, left):
    teacher, student, mask, spans = make_batch(seed=3, left=left)
    w = importance_weights(teacher, mask)
    ut, sw = pool_spans(teacher, w, spans)
    us, _ = pool_spans(student, w, spans)
    sm = span_mask_of(spans)
    per = dsa_per_sequence(us, ut, sw, sm, distance=distance, pairs=pairs)
    loss = dsa_loss(us, ut, sw, sm, distance=distance, pairs=pairs)

    ref_ut, ref_sw = ref_pool(teacher, w, spans)
    ref_us, _ = ref_pool(student, w, spans)
    ref_per = ref_dsa(ref_us, ref_ut, ref_sw, len(mask), distance, pairs)
    torch.testing.assert_close(per, torch.tensor(ref_per, dtype=DT), **TOL)
    torch.testing.assert_close(loss.item(), sum(ref_per) / len(ref_per), **TOL)
    assert loss.item() > 1e-4  # non-trivial


def test_hid_matches_reference(batch):
    teacher, student, mask, spans = batch
    w = importance_weights(teacher, mask)
    gen = torch.Generator().manual_seed(4)
    W = torch.randn(student.shape[-1], teacher.shape[-1], generator=gen, dtype=DT)
    proj = student @ W
    covered = spans.bool().any(-2)
    per = hid_per_sequence(proj, teacher, w, covered)
    ref = ref_hid(proj, teacher, w, covered)
    torch.testing.assert_close(per, torch.tensor(ref, dtype=DT), **TOL)
    torch.testing.assert_close(hid_loss(proj, teacher, w, covered).item(), sum(ref) / len(ref), **TOL)


def test_unit_distances_match_reference():
    gen = torch.Generator().manual_seed(5)
    u = torch.randn(6, 4, generator=gen, dtype=DT)
    for distance in ("cosine", "normalized_euclidean"):
        D = unit_distances(u, distance=distance)
        ref = torch.tensor([[ref_dist(u[i], u[j], distance) for j in range(6)] for i in range(6)], dtype=DT)
        torch.testing.assert_close(D, ref, rtol=1e-10, atol=1e-12)


def test_invalid_options_raise(batch):
    teacher, _, mask, spans = batch
    w = importance_weights(teacher, mask)
    with pytest.raises(ValueError):
        pool_spans(teacher, w, spans, aggregation="max")
    u, sw = pool_spans(teacher, w, spans)
    with pytest.raises(ValueError):
        dsa_loss(u, u, sw, span_mask_of(spans), distance="l1")
    with pytest.raises(ValueError):
        dsa_loss(u, u, sw, span_mask_of(spans), pairs="lower")


# ----------------------------------------------------------------------------------------------
# 2. Importance-weight properties
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("left", [False, True])
def test_importance_weights_zero_at_padding_and_sum_to_one(left):
    teacher, _, mask, _ = make_batch(seed=6, left=left)
    w = importance_weights(teacher, mask)
    assert (w[~mask] == 0).all()
    assert (w[mask] > 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(len(mask), dtype=DT), **TOL)


def test_single_real_token_gets_weight_one(batch):
    teacher, _, mask, _ = batch
    w = importance_weights(teacher, mask)
    b = int((mask.sum(-1) == 1).nonzero()[0])
    assert w[b][mask[b]].item() == 1.0
    assert torch.isfinite(w).all()


def test_two_real_tokens_get_half_each_without_self_loops():
    # With no self-loop, each of the 2 tokens sends all of its attention to the other one.
    gen = torch.Generator().manual_seed(7)
    H = torch.randn(1, 5, 8, generator=gen, dtype=DT)
    H[0, 0] *= 1000.0
    H[0, 0] += 300.0
    mask = torch.tensor([[True, True, False, False, False]])
    w = importance_weights(H, mask)
    torch.testing.assert_close(w[0], torch.tensor([0.5, 0.5, 0, 0, 0], dtype=DT), **TOL)


def test_no_self_loop_when_self_attention_would_dominate():
    # Token 2 has a huge mean offset: ||Ĥ_2||² ≫ others, so with self-loops row 2 would attend ~only to
    # itself. Without self-loops the implementation must match the reference and differ from the
    # with-self-loop version.
    gen = torch.Generator().manual_seed(8)
    N, d = 6, 16
    H = torch.randn(1, N + 2, d, generator=gen, dtype=DT)
    H[0, 2] = 40.0 + 0.1 * torch.randn(d, generator=gen, dtype=DT)
    mask = torch.zeros(1, N + 2, dtype=torch.bool)
    mask[0, :N] = True
    w = importance_weights(H, mask)
    ref = ref_importance(H, mask)
    torch.testing.assert_close(w, ref, **TOL)

    # with-self-loop variant (what a bug would give)
    Hr = H[0, :N]
    Hh = Hr / Hr.std(-1, correction=0, keepdim=True)
    alpha = torch.softmax(Hh @ Hh.T / math.sqrt(d), dim=-1)
    w_self = alpha.mean(0)
    assert alpha[2, 2] > 0.99  # self-attention would dominate
    assert (w[0, :N] - w_self).abs().max() > 0.05


def test_uniform_is_one_over_n_with_layer_dims(batch):
    teacher, _, mask, _ = batch
    stack = torch.stack([teacher, 2 * teacher, -teacher])
    w = importance_weights(stack, mask, uniform=True)
    assert w.shape == stack.shape[:-1]
    n = mask.sum(-1, keepdim=True).to(DT)
    for l in range(3):
        torch.testing.assert_close(w[l], mask.to(DT) / n, **TOL)


# ----------------------------------------------------------------------------------------------
# 3. Invariances, padding, layer stacking, gradients
# ----------------------------------------------------------------------------------------------


def test_dsa_and_hid_zero_when_student_equals_teacher(batch):
    teacher, _, mask, spans = batch
    w = importance_weights(teacher, mask)
    sm = span_mask_of(spans)
    ut, sw = pool_spans(teacher, w, spans)
    us, _ = pool_spans(teacher.clone(), w, spans)
    for distance in ("cosine", "normalized_euclidean"):
        for pairs in ("all", "upper"):
            assert abs(dsa_loss(us, ut, sw, sm, distance=distance, pairs=pairs).item()) < 1e-14
    proj = teacher.clone() @ torch.eye(teacher.shape[-1], dtype=DT)  # identity projector
    covered = spans.bool().any(-2)
    assert abs(hid_loss(proj, teacher, w, covered).item()) < 1e-12


def _random_orthogonal(n, gen):
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    return q * torch.sign(torch.diagonal(r))


def _dsa_from_states(student, teacher, mask, spans, **kw):
    w = importance_weights(teacher, mask)
    ut, sw = pool_spans(teacher, w, spans)
    us, _ = pool_spans(student, w, spans)
    return dsa_loss(us, ut, sw, span_mask_of(spans), **kw)


@pytest.mark.parametrize("distance", ["cosine", "normalized_euclidean"])
def test_dsa_invariant_to_rotation_and_positive_scaling(batch, distance):
    teacher, student, mask, spans = batch
    gen = torch.Generator().manual_seed(9)
    Q = _random_orthogonal(student.shape[-1], gen)
    base = _dsa_from_states(student, teacher, mask, spans, distance=distance)
    rotated = _dsa_from_states(3.7 * (student @ Q), teacher, mask, spans, distance=distance)
    assert base.item() > 1e-4
    assert abs(rotated.item() - base.item()) < 1e-10
    # same at the unit level, directly
    w = importance_weights(teacher, mask)
    ut, sw = pool_spans(teacher, w, spans)
    us, _ = pool_spans(student, w, spans)
    sm = span_mask_of(spans)
    a = dsa_loss(us, ut, sw, sm, distance=distance)
    b = dsa_loss(0.01 * us @ Q, ut, sw, sm, distance=distance)
    assert abs(a.item() - b.item()) < 1e-10


def test_dsa_not_invariant_to_general_linear_map(batch):
    teacher, student, mask, spans = batch
    gen = torch.Generator().manual_seed(10)
    A = torch.randn(student.shape[-1], student.shape[-1], generator=gen, dtype=DT)
    base = _dsa_from_states(student, teacher, mask, spans)
    mapped = _dsa_from_states(student @ A, teacher, mask, spans)
    assert abs(mapped.item() - base.item()) > 1e-4


@pytest.mark.parametrize("left", [False, True])
def test_extra_padding_does_not_change_results(left):
    teacher, student, mask, spans = make_batch(seed=11, left=left)
    B, T, dt = teacher.shape
    ds = student.shape[-1]
    extra_t, extra_k = 5, 3
    gen = torch.Generator().manual_seed(12)

    def pad_t(x, fill):
        g = fill * torch.randn(B, extra_t, x.shape[-1], generator=gen, dtype=DT) + fill
        return torch.cat([g, x], 1) if left else torch.cat([x, g], 1)

    teacher2, student2 = pad_t(teacher, 1e3), pad_t(student, -7e2)
    z = torch.zeros(B, extra_t, dtype=torch.bool)
    mask2 = torch.cat([z, mask], 1) if left else torch.cat([mask, z], 1)
    zs = torch.zeros(B, spans.shape[1], extra_t, dtype=DT)
    spans2 = torch.cat([zs, spans], 2) if left else torch.cat([spans, zs], 2)
    spans2 = torch.cat([spans2, torch.zeros(B, extra_k, T + extra_t, dtype=DT)], 1)
    # also scramble the garbage at the original padding positions
    teacher2[~mask2] = 5e2 * torch.randn(int((~mask2).sum()), dt, generator=gen, dtype=DT)
    student2[~mask2] = 5e2 * torch.randn(int((~mask2).sum()), ds, generator=gen, dtype=DT)
    sl = slice(extra_t, None) if left else slice(0, T)

    w1 = importance_weights(teacher, mask)
    w2 = importance_weights(teacher2, mask2)
    torch.testing.assert_close(w2[:, sl], w1, **TOL)
    assert (w2[~mask2] == 0).all()

    W = torch.randn(ds, dt, generator=gen, dtype=DT)
    for distance in ("cosine", "normalized_euclidean"):
        for pairs in ("all", "upper"):
            a = _dsa_from_states(student, teacher, mask, spans, distance=distance, pairs=pairs)
            b = _dsa_from_states(student2, teacher2, mask2, spans2, distance=distance, pairs=pairs)
            torch.testing.assert_close(b, a, **TOL)
    h1 = hid_loss(student @ W, teacher, w1, spans.bool().any(-2))
    h2 = hid_loss(student2 @ W, teacher2, w2, spans2.bool().any(-2))
    torch.testing.assert_close(h2, h1, **TOL)


@pytest.mark.parametrize("per_layer_spans", [False, True])
def test_layer_stacking(per_layer_spans):
    L = 3
    batches = [make_batch(seed=20 + l) for l in range(L)]
    mask = batches[0][2]  # same lengths for all seeds
    teacher = torch.stack([b[0] for b in batches])
    student = torch.stack([b[1] for b in batches])
    spans_l = [b[3] for b in batches] if per_layer_spans else [batches[0][3]] * L
    spans = torch.stack(spans_l) if per_layer_spans else batches[0][3]
    gen = torch.Generator().manual_seed(13)
    W = torch.randn(L, student.shape[-1], teacher.shape[-1], generator=gen, dtype=DT)

    w = importance_weights(teacher, mask)
    ut, sw = pool_spans(teacher, w, spans)
    us, _ = pool_spans(student, w, spans)
    sm = span_mask_of(spans)
    covered = spans.bool().any(-2)
    proj = student @ W[:, None]  # [L,B,T,ds] @ [L,1,ds,dt]

    dsa_layers, hid_layers = [], []
    for l in range(L):
        wl = importance_weights(teacher[l], mask)
        torch.testing.assert_close(w[l], wl, **TOL)
        utl, swl = pool_spans(teacher[l], wl, spans_l[l])
        usl, _ = pool_spans(student[l], wl, spans_l[l])
        dsa_layers.append(dsa_loss(usl, utl, swl, span_mask_of(spans_l[l])))
        hid_layers.append(hid_loss(student[l] @ W[l], teacher[l], wl, spans_l[l].bool().any(-2)))
    for distance in ("cosine", "normalized_euclidean"):
        stacked = dsa_loss(us, ut, sw, sm, distance=distance)
        per = [
            dsa_loss(us[l], ut[l], sw[l], span_mask_of(spans_l[l]), distance=distance) for l in range(L)
        ]
        torch.testing.assert_close(stacked, torch.stack(per).mean(), **TOL)
    torch.testing.assert_close(dsa_loss(us, ut, sw, sm), torch.stack(dsa_layers).mean(), **TOL)
    torch.testing.assert_close(hid_loss(proj, teacher, w, covered), torch.stack(hid_layers).sum(), **TOL)


def test_gradients_flow_to_student_and_projector_not_teacher(batch):
    teacher_data, student_data, mask, spans = batch
    teacher = teacher_data.clone()  # requires_grad=False
    student = student_data.clone().requires_grad_(True)
    proj = torch.nn.Linear(student.shape[-1], teacher.shape[-1], bias=False).to(DT)
    with torch.no_grad():
        w = importance_weights(teacher, mask)
        ut, sw = pool_spans(teacher, w, spans)
    us, _ = pool_spans(student, w, spans)
    sm = span_mask_of(spans)
    covered = spans.bool().any(-2)
    loss = dsa_loss(us, ut, sw, sm) + hid_loss(proj(student), teacher, w, covered)
    loss.backward()
    assert teacher.grad is None and not teacher.requires_grad
    assert not w.requires_grad and not ut.requires_grad and not sw.requires_grad
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert proj.weight.grad is not None and torch.isfinite(proj.weight.grad).all()
    assert proj.weight.grad.abs().sum() > 0
    assert student.grad[covered].abs().sum() > 0
    # tokens outside every span (incl. padding) get no gradient
    assert (student.grad[~covered] == 0).all()

    # DSA alone also gives finite, non-zero gradients (padded spans/zero units must not produce NaN)
    student.grad = None
    us, _ = pool_spans(student, w, spans)
    dsa_loss(us, ut, sw, sm, distance="normalized_euclidean", pairs="upper").backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# 4. normalized Euclidean = 2 × cosine distance
# ----------------------------------------------------------------------------------------------


def test_normalized_euclidean_is_twice_cosine(batch):
    teacher, student, mask, spans = batch
    w = importance_weights(teacher, mask)
    ut, sw = pool_spans(teacher, w, spans)
    us, _ = pool_spans(student, w, spans)
    sm = span_mask_of(spans)
    for u in (ut, us):
        torch.testing.assert_close(
            unit_distances(u, distance="normalized_euclidean"), 2 * unit_distances(u, distance="cosine"), **TOL
        )
    for pairs in ("all", "upper"):
        c = dsa_loss(us, ut, sw, sm, distance="cosine", pairs=pairs)
        e = dsa_loss(us, ut, sw, sm, distance="normalized_euclidean", pairs=pairs)
        torch.testing.assert_close(e, 4 * c, **TOL)
    # "all" counts each pair twice
    torch.testing.assert_close(
        dsa_loss(us, ut, sw, sm, pairs="all"), 2 * dsa_loss(us, ut, sw, sm, pairs="upper"), **TOL
    )
