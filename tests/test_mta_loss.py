"""The batched MTA plug-in (all key layers at once) against per-layer calls of the functional core."""

import torch
from torch import nn

from mtakd.config import MTAConfig
from mtakd.mta import KeyLayer, MTALoss
from mtakd.mta.functional import dsa_loss, hid_loss, importance_weights, pool_spans

B, T, DS, DT = 3, 10, 6, 8


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    s_hidden = tuple(torch.randn(B, T, DS, generator=g, dtype=torch.float64) for _ in range(4))
    t_hidden = tuple(torch.randn(B, T, DT, generator=g, dtype=torch.float64) for _ in range(7))
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


def test_batched_loss_equals_per_layer_functional_calls():
    s_hidden, t_hidden, mask, spans = _setup()
    keys = [KeyLayer(1, 2, "word"), KeyLayer(2, 4, "phrase"), KeyLayer(3, 6, "phrase")]
    cfg = MTAConfig(lambda_dsa=2.0, lambda_hid=0.2, projector_init="random")
    mta = MTALoss(cfg, keys)
    projectors = mta.build_projectors(DS, DT).double()
    got = mta(s_hidden, t_hidden, mask, spans, projectors)
    dsa, hid = [], []
    for k, p in zip(keys, projectors):
        sp = spans[f"{k.granularity}_spans"]
        w = importance_weights(t_hidden[k.teacher], mask.bool())
        us, _ = pool_spans(s_hidden[k.student], w, sp)
        ut, sw = pool_spans(t_hidden[k.teacher], w, sp)
        dsa.append(dsa_loss(us, ut, sw, sp.any(-1)))
        hid.append(hid_loss(p(s_hidden[k.student]), t_hidden[k.teacher], w, sp.any(-2)))
    torch.testing.assert_close(got["dsa"], torch.stack(dsa).mean())
    torch.testing.assert_close(got["hid"], torch.stack(hid).sum())
    assert got["dsa"].item() > 0 and got["hid"].item() > 0
    torch.testing.assert_close(mta.total(got), 2.0 * got["dsa"] + 0.2 * got["hid"])


def test_zero_when_student_equals_teacher_with_identity_projectors():
    _, t_hidden, mask, spans = _setup()
    keys = [KeyLayer(2, 2, "word"), KeyLayer(4, 4, "phrase")]
    mta = MTALoss(MTAConfig(), keys)
    projectors = mta.build_projectors(DT, DT).double()  # auto: identity when widths match
    out = mta(t_hidden, t_hidden, mask, spans, projectors)
    assert float(out["dsa"].detach()) < 1e-12 and float(out["hid"].detach()) < 1e-12


def test_gradients_reach_student_and_projectors_not_teacher():
    s_hidden, t_hidden, mask, spans = _setup()
    student = nn.Linear(DS, DS).double()
    teacher_params = nn.Parameter(torch.ones(DT, dtype=torch.float64))
    s_states = tuple(student(h) for h in s_hidden)
    t_states = tuple(h * teacher_params for h in t_hidden)
    mta = MTALoss(MTAConfig(projector_init="random"), [KeyLayer(1, 3, "word"), KeyLayer(3, 6, "phrase")])
    projectors = mta.build_projectors(DS, DT).double()
    mta.total(mta(s_states, t_states, mask, spans, projectors)).backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert all(p.weight.grad.abs().sum() > 0 for p in projectors)
    assert teacher_params.grad is None  # teacher states are used under no_grad


def test_switches_dsa_only_hid_only_uniform():
    s_hidden, t_hidden, mask, spans = _setup()
    keys = [KeyLayer(1, 2, "word")]
    projectors = MTALoss(MTAConfig(), keys).build_projectors(DS, DT).double()
    assert set(MTALoss(MTAConfig(lambda_hid=0), keys)(s_hidden, t_hidden, mask, spans, projectors)) == {"dsa"}
    assert set(MTALoss(MTAConfig(lambda_dsa=0), keys)(s_hidden, t_hidden, mask, spans, projectors)) == {"hid"}
    a = MTALoss(MTAConfig(weights="uniform"), keys)(s_hidden, t_hidden, mask, spans, projectors)
    b = MTALoss(MTAConfig(), keys)(s_hidden, t_hidden, mask, spans, projectors)
    assert not torch.allclose(a["dsa"], b["dsa"])


def test_centering_switch_makes_weights_invariant_to_per_token_offsets():
    from mtakd.mta.functional import importance_weights

    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    shifted = h + 3.0 * torch.randn(2, 6, 1, generator=g, dtype=torch.float64)  # a different offset per token
    torch.testing.assert_close(importance_weights(h, mask, center=True), importance_weights(shifted, mask, center=True))
    assert not torch.allclose(importance_weights(h, mask), importance_weights(shifted, mask))  # the default is not
