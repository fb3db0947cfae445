"""The batched MTA plug-in (all key layers at once) against the loop reference of tests/test_mta_functional.py,
hand-computed cases and finite differences; projector sizing (OPT's project_out) and initialisation."""

import math

import pytest
import torch
from torch import nn

from mtakd.config import MTAConfig
from mtakd.mta import KeyLayer, MTALoss
from tests.test_mta_functional import TOL, ref_dsa, ref_hid, ref_importance, ref_pool

B, T, DS, DT = 3, 10, 6, 8


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    # token means ≠ 0 (a shared offset per token), so that std and rms differ
    s_hidden = tuple(torch.randn(B, T, DS, generator=g, dtype=torch.float64)
                     + torch.randn(B, T, 1, generator=g, dtype=torch.float64) for _ in range(4))
    t_hidden = tuple(torch.randn(B, T, DT, generator=g, dtype=torch.float64)
                     + torch.randn(B, T, 1, generator=g, dtype=torch.float64) for _ in range(7))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    word = torch.zeros(B, 4, T, dtype=torch.bool)
    phrase = torch.zeros(B, 2, T, dtype=torch.bool)
    for b, n in enumerate((10, 7, 4)):
        for k, (a, e) in enumerate([(0, 1), (1, 3), (3, 4), (5, 7)]):
            if e <= n:
                word[b, k, a:e] = True
        phrase[b, 0, : min(3, n)] = True
        if n > 5:
            phrase[b, 1, 4:6] = True
    return s_hidden, t_hidden, mask, {"word_spans": word, "phrase_spans": phrase}


def _ref_mta(s_hidden, t_hidden, mask, spans, keys, projectors, *, weights="teacher", sigma="std"):
    """(L_DSA, L_Hid) by the loop reference of tests/test_mta_functional.py, one key layer at a time (MTA_SPEC
    §4–§7): mean of the per-layer DSA, sum of the per-layer L_Hid, each a per-sequence sum averaged over the batch."""
    dsa, hid = [], []
    for k, p in zip(keys, projectors):
        sp = spans[f"{k.granularity}_spans"]
        hs, ht = s_hidden[k.student].detach(), t_hidden[k.teacher].detach()
        n = hs.shape[0]
        w_teacher = ref_importance(ht, mask, uniform=weights == "uniform", sigma=sigma)
        w_student = ref_importance(hs, mask, sigma=sigma)
        w = w_student if weights == "student" else w_teacher  # teacher pooling, w^sp, L_Hid
        w_pool = w_student if weights in ("student", "student_pooling") else w  # the student's pooling
        ut, sw = ref_pool(ht, w, sp)
        us, _ = ref_pool(hs, w_pool, sp)
        dsa.append(sum(ref_dsa(us, ut, sw, n)) / n)
        if p is not None:
            with torch.no_grad():
                proj = p(hs)
            hid.append(sum(ref_hid(proj, ht, w, sp.any(-2))) / n)
    return sum(dsa) / len(dsa), sum(hid)


KEYS = [KeyLayer(1, 2, "word"), KeyLayer(2, 4, "phrase"), KeyLayer(3, 6, "phrase")]


def test_batched_loss_matches_the_loop_reference():
    s_hidden, t_hidden, mask, spans = _setup()
    mta = MTALoss(MTAConfig(lambda_dsa=2.0, lambda_hid=0.2), KEYS)
    projectors = mta.build_projectors(DS, DT, from_teacher=False).double()
    got = mta(s_hidden, t_hidden, mask, spans, projectors)
    dsa, hid = _ref_mta(s_hidden, t_hidden, mask, spans, KEYS, projectors)
    assert dsa > 1e-3 and hid > 1e-3
    torch.testing.assert_close(got["dsa"].item(), dsa, **TOL)
    torch.testing.assert_close(got["hid"].item(), hid, **TOL)
    torch.testing.assert_close(mta.total(got).item(), 2.0 * dsa + 0.2 * hid, **TOL)


def test_a_hand_computed_case():
    """Two one-token words in one sequence of two tokens: w = (½, ½) (no self-loops), each unit is its token, so
    L_DSA = 2·¼·(d^S − d^T)² (the pair counted twice) and L_Hid = ½ Σ_t (1 − cos)."""
    e1, e2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    t = torch.stack([e1, e2])[None]  # teacher tokens orthogonal: d^T = 1
    s = torch.stack([e1, (e1 + e2) / 2])[None]  # student at 45°: d^S = 1 − 1/√2
    words = torch.tensor([[[True, False], [False, True]]])
    mta = MTALoss(MTAConfig(lambda_dsa=1.0, lambda_hid=1.0), [KeyLayer(1, 1, "word")])
    proj = mta.build_projectors(2, 2, from_teacher=True).double()  # identity
    got = mta((s, s), (t, t), torch.ones(1, 2, dtype=torch.long), {"word_spans": words}, proj)
    torch.testing.assert_close(got["dsa"].item(), 2 * 0.25 * (1 - 1 / math.sqrt(2) - 1) ** 2, **TOL)
    torch.testing.assert_close(got["hid"].item(), 0.5 * (0 + (1 - 1 / math.sqrt(2))), **TOL)


def test_zero_when_student_equals_teacher_with_identity_projectors():
    _, t_hidden, mask, spans = _setup()
    keys = [KeyLayer(2, 2, "word"), KeyLayer(4, 4, "phrase")]
    mta = MTALoss(MTAConfig(), keys)
    projectors = mta.build_projectors(DT, DT, from_teacher=True).double()  # auto: identity
    out = mta(t_hidden, t_hidden, mask, spans, projectors)
    assert float(out["dsa"].detach()) < 1e-12 and float(out["hid"].detach()) < 1e-12


def test_gradients_match_finite_differences_and_skip_the_teacher():
    """The analytic gradient of λ_DSA·L_DSA + λ_Hid·L_Hid w.r.t. the student states and the projectors equals
    central finite differences (torch.autograd.gradcheck); the teacher's states get none."""
    s_hidden, t_hidden, mask, spans = _setup()
    keys = [KeyLayer(1, 3, "word"), KeyLayer(3, 6, "phrase")]
    mta = MTALoss(MTAConfig(), keys)
    teacher_scale = nn.Parameter(torch.ones(DT, dtype=torch.float64))

    def total(h1, h3, w1, w3):
        projectors = nn.ModuleList(nn.Linear(DS, DT, bias=False) for _ in keys)
        for p, w in zip(projectors, (w1, w3)):
            del p.weight
            p.weight = w  # a plain tensor, so that gradcheck can perturb it
        states = (s_hidden[0], h1, s_hidden[2], h3)
        return mta.total(mta(states, tuple(h * teacher_scale for h in t_hidden), mask, spans, projectors))

    g = torch.Generator().manual_seed(5)
    inputs = (s_hidden[1].clone(), s_hidden[3].clone(), torch.randn(DT, DS, generator=g, dtype=torch.float64),
              torch.randn(DT, DS, generator=g, dtype=torch.float64))
    inputs = tuple(x.requires_grad_(True) for x in inputs)
    assert torch.autograd.gradcheck(total, inputs, eps=1e-6, atol=1e-7)
    total(*inputs).backward()
    assert teacher_scale.grad is None  # teacher states are used under no_grad
    assert all(x.grad.abs().sum() > 0 for x in inputs)


@pytest.mark.parametrize("weights", ["teacher", "student", "student_pooling", "uniform"])
@pytest.mark.parametrize("sigma", ["std", "rms"])
def test_weight_sources_and_sigma_match_the_loop_reference(weights, sigma):
    s_hidden, t_hidden, mask, spans = _setup(seed=3)
    mta = MTALoss(MTAConfig(weights=weights, sigma=sigma), KEYS)
    projectors = mta.build_projectors(DS, DT, from_teacher=False).double()
    got = mta(s_hidden, t_hidden, mask, spans, projectors)
    dsa, hid = _ref_mta(s_hidden, t_hidden, mask, spans, KEYS, projectors, weights=weights, sigma=sigma)
    torch.testing.assert_close(got["dsa"].item(), dsa, **TOL)
    torch.testing.assert_close(got["hid"].item(), hid, **TOL)


def test_student_pooling_differs_from_student_and_teacher():
    """student_pooling changes only the student's pooling: its L_Hid is the teacher reading's, its L_DSA is neither."""
    s_hidden, t_hidden, mask, spans = _setup(seed=4)
    projectors = MTALoss(MTAConfig(), KEYS).build_projectors(DS, DT, from_teacher=False).double()
    out = {w: MTALoss(MTAConfig(weights=w), KEYS)(s_hidden, t_hidden, mask, spans, projectors)
           for w in ("teacher", "student", "student_pooling")}
    torch.testing.assert_close(out["student_pooling"]["hid"], out["teacher"]["hid"])
    assert (out["student_pooling"]["hid"] - out["student"]["hid"]).abs() > 1e-6
    for other in ("teacher", "student"):
        assert (out["student_pooling"]["dsa"] - out[other]["dsa"]).abs() > 1e-6


def test_switches_dsa_only_hid_only():
    s_hidden, t_hidden, mask, spans = _setup()
    keys = [KeyLayer(1, 2, "word")]
    projectors = MTALoss(MTAConfig(), keys).build_projectors(DS, DT, from_teacher=False).double()
    dsa, hid = _ref_mta(s_hidden, t_hidden, mask, spans, keys, projectors)
    only_dsa = MTALoss(MTAConfig(lambda_hid=0), keys)(s_hidden, t_hidden, mask, spans, None)  # no projectors needed
    only_hid = MTALoss(MTAConfig(lambda_dsa=0), keys)(s_hidden, t_hidden, mask, spans, projectors)
    assert set(only_dsa) == {"dsa"} and set(only_hid) == {"hid"}
    torch.testing.assert_close(only_dsa["dsa"].item(), dsa, **TOL)
    torch.testing.assert_close(only_hid["hid"].item(), hid, **TOL)


# ------------------------------------------------------------------------------------ projectors
def _is_identity(p):
    return torch.equal(p.weight, torch.eye(*p.weight.shape))


def test_projector_init_auto_is_identity_only_for_a_student_built_from_the_teacher():
    keys = [KeyLayer(1, 2, "word"), KeyLayer(2, 4, "phrase")]
    auto = MTALoss(MTAConfig(), keys)
    assert all(_is_identity(p) for p in auto.build_projectors(8, 8, from_teacher=True))
    # a separately pretrained student of the same width: its basis is unrelated to the teacher's
    assert not any(_is_identity(p) for p in auto.build_projectors(8, 8, from_teacher=False))
    # per-layer widths: identity where they match (from the teacher), random where they do not
    mixed = auto.build_projectors([8, 4], [8, 8], from_teacher=True)
    assert [tuple(p.weight.shape) for p in mixed] == [(8, 8), (8, 4)] and _is_identity(mixed[0])
    assert not _is_identity(mixed[1])
    forced = MTALoss(MTAConfig(projector_init="identity"), keys)
    assert all(_is_identity(p) for p in forced.build_projectors(8, 8, from_teacher=False))
    with pytest.raises(ValueError, match="identity needs equal widths.*student layer 2 of width 4"):
        forced.build_projectors([8, 4], 8, from_teacher=True)
    random = MTALoss(MTAConfig(projector_init="random"), keys)
    assert not any(_is_identity(p) for p in random.build_projectors(8, 8, from_teacher=True))
    with pytest.raises(ValueError, match="one width per key layer"):
        auto.build_projectors([8], [8, 8], from_teacher=False)


def _tiny_opt(hidden, proj, layers, seed, dropout=0.0):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=50, hidden_size=hidden, word_embed_proj_dim=proj, num_hidden_layers=layers,
                    ffn_dim=2 * hidden, num_attention_heads=2, max_position_embeddings=32, dropout=dropout)
    return OPTForCausalLM(cfg).double().eval()


def test_opt_with_project_out_projectors_take_the_returned_widths():
    """OPT with word_embed_proj_dim ≠ hidden_size (as opt-350m) returns hidden_states[N] after project_out, narrower
    than config.hidden_size: the projectors are sized from the states, and MTA runs end to end (MTA_SPEC §7)."""
    teacher = _tiny_opt(hidden=24, proj=12, layers=4, seed=0)
    student = _tiny_opt(hidden=16, proj=8, layers=3, seed=1)
    keys = [KeyLayer(1, 2, "word"), KeyLayer(2, 3, "phrase"), KeyLayer(3, 4, "phrase")]  # the top: the last blocks
    mta = MTALoss(MTAConfig(), keys)
    projectors = mta.projectors_for(student, teacher, from_teacher=False).double()
    assert [(p.in_features, p.out_features) for p in projectors] == [(16, 24), (16, 24), (8, 12)]
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    s_out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    with torch.no_grad():
        t_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    spans = _opt_spans()
    parts = mta(s_out, t_out, mask, spans, projectors)
    dsa, hid = _ref_mta(s_out, t_out, mask, spans, keys, projectors)
    torch.testing.assert_close(parts["dsa"].item(), dsa, **TOL)
    torch.testing.assert_close(parts["hid"].item(), hid, **TOL)
    sized_by_config = mta.build_projectors(student.config.hidden_size, teacher.config.hidden_size,
                                           from_teacher=False).double()  # the old sizing: a clear error
    with pytest.raises(ValueError, match=r"maps 16→24, but hidden_states\[3\] / \[4\] are 8 / 12 wide"):
        mta(s_out, t_out, mask, spans, sized_by_config)
    mta.total(parts).backward()
    assert all(p.weight.grad.abs().sum() > 0 for p in projectors)
    assert student.model.decoder.project_out.weight.grad.abs().sum() > 0  # the top state's path is trained


def test_hidden_widths_reads_the_returned_states_and_leaves_the_random_state():
    from mtakd.mta.layers import hidden_widths

    model = _tiny_opt(hidden=16, proj=8, layers=3, seed=0, dropout=0.5).train()  # dropout draws random numbers
    before = torch.get_rng_state()
    assert hidden_widths(model, [0, 1, 2, 3]) == [16, 16, 16, 8]
    assert torch.equal(torch.get_rng_state(), before) and model.training


def _opt_spans():
    word = torch.zeros(2, 3, 6, dtype=torch.bool)
    word[:, 0, 0], word[:, 1, 1:3], word[:, 2, 3] = True, True, True
    phrase = torch.zeros(2, 2, 6, dtype=torch.bool)
    phrase[:, 0, 0:3], phrase[0, 1, 3:6], phrase[1, 1, 3] = True, True, True
    return {"word_spans": word, "phrase_spans": phrase}


def test_centering_switch_makes_weights_invariant_to_per_token_offsets():
    from mtakd.mta.functional import importance_weights

    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    shifted = h + 3.0 * torch.randn(2, 6, 1, generator=g, dtype=torch.float64)  # a different offset per token
    torch.testing.assert_close(importance_weights(h, mask, center=True), importance_weights(shifted, mask, center=True))
    assert not torch.allclose(importance_weights(h, mask), importance_weights(shifted, mask))  # the default is not
