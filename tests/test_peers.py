"""Loss parity with Hugging Face TRL (issue 27): mtakd's token divergences equal TRL's generalised JSD on the same
logits. Skipped when TRL (the optional ``peers`` extra) is not installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TOL = 1e-5


def _peers():
    spec = importlib.util.spec_from_file_location("bench_peers", BENCH / "peers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


peers = _peers()

# TRL beta → mtakd base: 0 forward KL, 1 reverse KL, 0.5 js, anything else gjsd with gjsd_beta = beta
CASES = [(0.0, "fkl"), (1.0, "rkl"), (0.5, "js"), (0.5, "gjsd"), (0.1, "gjsd"), (0.9, "gjsd")]


def _logits(seed=0):
    h_s, w_s, h_t, w_t, labels = peers.parity_batch(seed)
    return h_s, w_s, h_t, w_t, labels, h_s @ w_s.T, h_t @ w_t.T


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta,base", CASES)
def test_gkd_generalized_jsd_parity(beta, base, temperature):
    """Values and student-logit gradients equal TRL GKDTrainer's ``generalized_jsd_loss`` (full logits)."""
    *_, labels, s, t = _logits()
    s1 = s.clone().requires_grad_(True)
    ours = peers.mtakd_kd(base, s1, t, labels, temperature, beta if base == "gjsd" else None)
    s2 = s.clone().requires_grad_(True)
    theirs = peers.trl_gkd_jsd(s2, t, labels, beta, temperature)
    assert abs(ours.item() - theirs.item()) < TOL
    (g1,) = torch.autograd.grad(ours, s1)
    (g2,) = torch.autograd.grad(theirs, s2)
    assert torch.allclose(g1, g2, atol=TOL, rtol=0)


@pytest.mark.parametrize("chunk_size", [0, 5, 256])
@pytest.mark.parametrize("beta,base", CASES)
def test_distillation_trainer_chunked_parity(beta, base, chunk_size):
    """mtakd's chunked loss with fused LM heads equals TRL DistillationTrainer's chunked divergence (hidden states +
    heads, never full logits), value and gradient in the student's hidden states."""
    from mtakd.objectives.base import HiddenHead

    h_s, w_s, h_t, w_t, labels, _, _ = _logits(1)
    a = h_s.clone().requires_grad_(True)
    ours = peers.mtakd_kd(base, HiddenHead(a, lambda x: x @ w_s.T), HiddenHead(h_t, lambda x: x @ w_t.T), labels,
                          1.0, beta if base == "gjsd" else None, chunk_size=chunk_size)
    b = h_s.clone().requires_grad_(True)
    theirs = peers.trl_chunked_jsd(b, w_s, h_t, w_t, labels, beta, 1.0)
    assert abs(ours.item() - theirs.item()) < TOL
    (g1,) = torch.autograd.grad(ours, a)
    (g2,) = torch.autograd.grad(theirs, b)
    assert torch.allclose(g1, g2, atol=TOL, rtol=0)


def test_token_mean_over_the_batch():
    """Both reduce by the number of response tokens of the whole batch (not per sequence): with one sequence
    much longer than the other, still equal."""
    *_, labels, s, t = _logits(2)
    labels = labels.clone()
    labels[0, :-2] = -100  # row 0: 2 response tokens, the others many more
    ours = peers.mtakd_kd("fkl", s, t, labels, 1.0)
    theirs = peers.trl_gkd_jsd(s, t, labels, 0.0, 1.0)
    assert abs(ours.item() - theirs.item()) < TOL


def test_run_parity_rows_within_tolerance():
    """The benchmark's parity section (what BENCHMARKS.md reports) agrees within 1e-5 everywhere."""
    rows = peers.run_parity(betas=(0.0, 1.0, 0.5), temperatures=(1.0,))
    assert [r["mtakd"] for r in rows] == ["fkl", "rkl", "js"]
    for r in rows:
        for key in ("abs_diff_gkd", "abs_diff_chunked", "grad_max_diff_gkd", "grad_max_diff_chunked"):
            assert r[key] < TOL, (r["mtakd"], key, r[key])


@pytest.mark.skipif(not peers.TRAIN_TEXT.is_file(), reason="needs the shared data (../shared/data/train/train.jsonl)")
def test_tiny_tokenizer_and_rows():
    """The tiny pair's synthetic tokenizer has exactly Qwen's 151,936 ids and round-trips the data's words; every row
    of the tiny setting is 256 prompt + 256 response tokens (EOS last), the same rows for all its configurations."""
    tok = peers.tiny_tokenizer()
    assert len(tok) == tok.vocab_size == peers.VOCAB_152K == 151_936
    words = peers._text_words()
    text = " ".join(words)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(words) and tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert max(ids) < len(tok) and tok.convert_ids_to_tokens(len(tok) - 1).startswith("<filler_")
    rows = peers.tiny_examples(4)
    for row in rows:
        assert row["input_ids"].shape == (512,) and row["input_ids"][-1] == tok.eos_token_id
        assert (row["labels"][:256] == -100).all() and (row["labels"][256:] == row["input_ids"][256:]).all()
    assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(rows, peers.tiny_examples(4)))
