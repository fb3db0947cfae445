"""Base objectives against slow references written straight from the formulas (pure Python loops)."""

import math
from types import SimpleNamespace

import pytest
import torch

from mtakd.config import ObjectiveConfig
from mtakd.objectives import OBJECTIVES, TokenDivergence

B, T, V = 3, 7, 11
PAPER_BASES = {"distillm", "distillm2", "fdd"}  # the MTA paper's bases: tested in test_bases.py
DIVERGENCES = sorted(n for n, c in OBJECTIVES.items() if issubclass(c, TokenDivergence) and n not in PAPER_BASES)


def test_registry_holds_every_divergence():
    assert set(DIVERGENCES) == {"fkl", "rkl", "js", "tvd", "skl", "srkl", "akl", "gjsd"}
    assert set(OBJECTIVES) == set(DIVERGENCES) | {"sft", "uld"} | PAPER_BASES  # uld: test_cross_tokenizer.py


# ------------------------------------------------------------------------------------ fixtures
def make_labels() -> torch.Tensor:
    """Rows: (prompt, response, right padding) = (2, 5, 0), (3, 2, 2), (1, 4, 2)."""
    labels = torch.full((B, T), -100, dtype=torch.long)
    g = torch.Generator().manual_seed(1)
    for b, (prompt, response) in enumerate([(2, 5), (3, 2), (1, 4)]):
        labels[b, prompt : prompt + response] = torch.randint(0, V, (response,), generator=g)
    return labels


def make_logits(seed: int, scale: float = 2.0, dtype=torch.float64) -> torch.Tensor:
    return (torch.randn(B, T, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).to(dtype)


def run(name, s_logits, t_logits, labels, **cfg):
    obj = OBJECTIVES[name](ObjectiveConfig(base=name, **cfg))
    return obj(SimpleNamespace(logits=s_logits), SimpleNamespace(logits=t_logits), {"labels": labels})


def divergence(name, s_logits, t_logits, **cfg):
    """Per-row divergence of [N, V] logits through the module's own ``divergence``."""
    obj = OBJECTIVES[name](ObjectiveConfig(base=name, **cfg))
    return obj.divergence(s_logits.log_softmax(-1), t_logits.log_softmax(-1))


# ---------------------------------------------------------------------------- slow reference
def softmax(row):
    mx = max(row)
    e = [math.exp(x - mx) for x in row]
    z = sum(e)
    return [x / z for x in e]


def ref_kl(a, b):
    return sum(ai * math.log(ai / bi) for ai, bi in zip(a, b))


def ref_divergence(name, p, q, alpha, beta, mu):
    """p: teacher probabilities, q: student probabilities (lists)."""
    if name == "fkl":
        return ref_kl(p, q)
    if name == "rkl":
        return ref_kl(q, p)
    if name == "tvd":
        return 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q))
    if name == "js":
        m = [(pi + qi) / 2 for pi, qi in zip(p, q)]
        return 0.5 * ref_kl(p, m) + 0.5 * ref_kl(q, m)
    if name == "gjsd":
        m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
        return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)
    if name == "skl":
        return ref_kl(p, [alpha * pi + (1 - alpha) * qi for pi, qi in zip(p, q)])
    if name == "srkl":
        return ref_kl(q, [alpha * qi + (1 - alpha) * pi for pi, qi in zip(p, q)])
    if name == "akl":
        head, mass_before = set(), 0.0
        for v in sorted(range(len(p)), key=lambda v: -p[v]):  # descending teacher probability
            if mass_before < mu:  # up to and including the token where the cumulative mass reaches mu
                head.add(v)
            mass_before += p[v]
        g_head = sum(abs(p[v] - q[v]) for v in range(len(p)) if v in head)
        g_tail = sum(abs(p[v] - q[v]) for v in range(len(p)) if v not in head)
        return (g_head * ref_kl(p, q) + g_tail * ref_kl(q, p)) / (g_head + g_tail)
    raise KeyError(name)


def reference(name, s_logits, t_logits, labels, kd_ratio, temperature, alpha, beta, mu):
    s, t, y = s_logits.tolist(), t_logits.tolist(), labels.tolist()
    kd, ce, n = 0.0, 0.0, 0
    for b in range(len(y)):
        for pos in range(len(y[b]) - 1):
            target = y[b][pos + 1]
            if target == -100:
                continue
            n += 1
            q = softmax([x / temperature for x in s[b][pos]])
            p = softmax([x / temperature for x in t[b][pos]])
            kd += ref_divergence(name, p, q, alpha, beta, mu)
            ce -= math.log(softmax(s[b][pos])[target])  # CE on the raw (untempered) logits
    kd, ce = kd / n, ce / n
    return {"kd": kd, "ce": ce, "loss": (1 - kd_ratio) * ce + kd_ratio * kd}


# ------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("temperature,mu", [(1.0, 0.5), (2.0, 0.3)])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_matches_slow_reference(name, temperature, mu):
    cfg = dict(kd_ratio=0.3, temperature=temperature, skew_alpha=0.2, gjsd_beta=0.3, akl_mu=mu)
    s, t, labels = make_logits(0), make_logits(1), make_labels()
    out = run(name, s, t, labels, **cfg)
    ref = reference(name, s, t, labels, 0.3, temperature, 0.2, 0.3, mu)
    for key in ("kd", "ce", "loss"):
        assert out[key].item() == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key
    assert ref["kd"] > 1e-3  # the comparison is not between two zeros


def test_akl_head_includes_the_token_that_reaches_mu():
    # teacher (0.4, 0.35, 0.25), mu 0.5: head = {0, 1} (0.4 < 0.5 before token 1), tail = {2}
    p = torch.tensor([[0.4, 0.35, 0.25]], dtype=torch.float64)
    q = torch.tensor([[0.4, 0.25, 0.35]], dtype=torch.float64)  # g_head = g_tail = 0.1
    obj = OBJECTIVES["akl"](ObjectiveConfig(base="akl", akl_mu=0.5))
    got = obj.divergence(q.log(), p.log()).item()
    fkl, rkl = (p * (p / q).log()).sum().item(), (q * (q / p).log()).sum().item()
    assert got == pytest.approx(0.5 * fkl + 0.5 * rkl, rel=1e-12)
    # with mu 0.3 token 1 leaves the head (0.4 ≥ 0.3 before it): g_head = 0, pure reverse KL
    obj = OBJECTIVES["akl"](ObjectiveConfig(base="akl", akl_mu=0.3))
    assert obj.divergence(q.log(), p.log()).item() == pytest.approx(rkl, rel=1e-12)
    # exact boundary: teacher (0.5, 0.25, 0.25), mu 0.5 — token 0 reaches 0.5, so token 1 is tail
    p = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64)
    q = torch.tensor([[0.5, 0.35, 0.15]], dtype=torch.float64)  # gaps (0, 0.1, 0.1): g_head = 0
    assert torch.equal(p.log().exp().cumsum(-1), torch.tensor([[0.5, 0.75, 1.0]], dtype=torch.float64))
    obj = OBJECTIVES["akl"](ObjectiveConfig(base="akl", akl_mu=0.5))
    rkl = (q * (q / p).log()).sum().item()
    assert obj.divergence(q.log(), p.log()).item() == pytest.approx(rkl, rel=1e-12)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_zero_when_student_equals_teacher(name):
    logits, labels = make_logits(2), make_labels()
    out = run(name, logits, logits.clone(), labels, skew_alpha=0.2, gjsd_beta=0.3)
    assert abs(out["kd"].item()) <= 1e-10
    peaked = make_logits(2, scale=50.0)
    assert divergence(name, peaked.flatten(0, 1), peaked.flatten(0, 1)).abs().max().item() <= 1e-10


@pytest.mark.parametrize("name", DIVERGENCES)
def test_non_negative(name):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(400, V, generator=g, dtype=torch.float64) * torch.rand(400, 1, generator=g, dtype=torch.float64) * 8
    t = torch.randn(400, V, generator=g, dtype=torch.float64) * torch.rand(400, 1, generator=g, dtype=torch.float64) * 8
    d = divergence(name, s, t, skew_alpha=0.2, gjsd_beta=0.3)
    assert d.shape == (400,)
    assert d.min().item() >= -1e-12
    assert d.mean().item() > 1e-3


@pytest.mark.parametrize("name", DIVERGENCES + ["sft"])
def test_ignores_prompt_and_padding_positions(name):
    s, t, labels = make_logits(4), make_logits(5), make_labels()
    ignored = torch.ones(B, T, dtype=torch.bool)
    ignored[:, :-1] = labels[:, 1:].eq(-100)  # position t is scored iff labels[t+1] is a response token
    assert 0 < ignored.sum() < B * T
    noise = make_logits(6, scale=30.0)
    s2, t2 = s + noise * ignored[..., None], t - noise * ignored[..., None]
    base, moved = run(name, s, t, labels), run(name, s2, t2, labels)
    assert moved["loss"].item() == pytest.approx(base["loss"].item(), rel=1e-12)
    # ...while a scored position does matter
    s3 = s.clone()
    s3[~ignored] += noise[~ignored]
    assert abs(run(name, s3, t, labels)["loss"].item() - base["loss"].item()) > 1e-6


@pytest.mark.parametrize("name", DIVERGENCES)
def test_temperature_scales_kd_logits(name):
    s, t, labels = make_logits(7), make_logits(8), make_labels()
    hot = run(name, s, t, labels, temperature=2.0)
    scaled = run(name, s / 2, t / 2, labels, temperature=1.0)
    plain = run(name, s, t, labels, temperature=1.0)
    assert hot["kd"].item() == pytest.approx(scaled["kd"].item(), rel=1e-12)
    assert abs(hot["kd"].item() - plain["kd"].item()) > 1e-4
    assert hot["ce"].item() == pytest.approx(plain["ce"].item(), rel=1e-12)  # CE is not tempered


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_gradients_finite_for_peaked_logits(name, dtype):
    g = torch.Generator().manual_seed(9)
    labels = make_labels()
    for s, t in [
        (make_logits(10, dtype=dtype), make_logits(11, dtype=dtype)),
        # ±50 logits: near one-hot distributions, mostly on different tokens
        *[(torch.randint(0, 2, (B, T, V), generator=g).to(dtype) * 100 - 50,
           torch.randint(0, 2, (B, T, V), generator=g).to(dtype) * 100 - 50) for _ in range(3)],
        (torch.randn(B, T, V, generator=g).to(dtype) * 50, torch.randn(B, T, V, generator=g).to(dtype) * 50),
    ]:
        s = s.requires_grad_()
        out = run(name, s, t, labels, kd_ratio=1.0)
        out["loss"].backward()
        assert torch.isfinite(out["loss"]) and out["loss"].item() >= 0
        assert torch.isfinite(s.grad).all()
        assert s.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(set(DIVERGENCES) - {"akl"}))  # akl's weights are detached by design
def test_gradient_matches_finite_differences(name):
    g = torch.Generator().manual_seed(12)
    s = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 6, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: divergence(name, x, t, skew_alpha=0.2, gjsd_beta=0.3), (s,))


def test_akl_gradient_is_weighted_fkl_rkl_gradient():
    g = torch.Generator().manual_seed(13)
    s = torch.randn(5, V, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, V, generator=g, dtype=torch.float64)
    d = divergence("akl", s, t)
    fkl, rkl = divergence("fkl", s, t), divergence("rkl", s, t)
    w = ((d - rkl) / (fkl - rkl)).detach()  # head weight, per row
    (grad,) = torch.autograd.grad(d.sum(), s)
    (expect,) = torch.autograd.grad((w * fkl + (1 - w) * rkl).sum(), s)
    assert ((w > 0) & (w < 1)).all()
    torch.testing.assert_close(grad, expect, rtol=1e-10, atol=1e-12)


def test_sft_is_cross_entropy_without_teacher():
    s, labels = make_logits(14), make_labels()
    cls = OBJECTIVES["sft"]
    assert cls.needs_teacher is False
    assert all(OBJECTIVES[n].needs_teacher for n in DIVERGENCES)
    out = cls(ObjectiveConfig(base="sft"))(SimpleNamespace(logits=s), None, {"labels": labels})
    ref = reference("fkl", s, s, labels, 0.0, 1.0, 0.1, 0.5, 0.5)["ce"]
    assert out["loss"].item() == pytest.approx(ref, rel=1e-12)
    assert out["ce"].item() == pytest.approx(ref, rel=1e-12)


def test_no_response_tokens_gives_zero_loss():
    s, t = make_logits(15).requires_grad_(), make_logits(16)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for name in DIVERGENCES + ["sft"]:
        out = run(name, s, t, labels)
        assert out["loss"].item() == 0.0
        out["loss"].backward()
    assert torch.isfinite(s.grad).all()


def test_js_is_gjsd_at_one_half():
    s, t = make_logits(17).flatten(0, 1), make_logits(18).flatten(0, 1)
    js = divergence("js", s, t, gjsd_beta=0.3)  # js ignores gjsd_beta
    torch.testing.assert_close(js, divergence("gjsd", s, t, gjsd_beta=0.5), rtol=1e-12, atol=1e-14)
    assert (js - divergence("gjsd", s, t, gjsd_beta=0.3)).abs().max() > 1e-4


@pytest.mark.parametrize("skewed,plain", [("skl", "fkl"), ("srkl", "rkl")])
def test_skew_zero_is_plain_kl(skewed, plain):
    s, t = make_logits(19).flatten(0, 1), make_logits(20).flatten(0, 1)
    torch.testing.assert_close(divergence(skewed, s, t, skew_alpha=0.0), divergence(plain, s, t), rtol=1e-12, atol=1e-14)
    assert (divergence(skewed, s, t, skew_alpha=0.1) - divergence(plain, s, t)).abs().max() > 1e-4
    assert divergence(skewed, s, t, skew_alpha=1.0).abs().max() <= 1e-12
