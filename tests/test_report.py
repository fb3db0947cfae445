"""mtakd.report on hand-written metrics.json files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mtakd import report
from mtakd.config import ConfigError
from mtakd.data import DataError
from mtakd.report import compare, paired_bootstrap
from tests.conftest import run_subcommand


def _cli(argv):
    return run_subcommand(report, argv)


def _fake_run(path, per_prompt: dict[str, list[float]], std=1.0):
    sets = {
        name: {"mean": float(np.mean(v)), "std": std, "per_seed": {"10": float(np.mean(v))}, "n": len(v),
               "empty_generations": 0, "prompts_truncated": 0}
        for name, v in per_prompt.items()
    }
    avg = float(np.mean([s["mean"] for s in sets.values()]))
    metrics = {"model": path.name, "protocol": {}, "sets": sets, "average": {"mean": avg, "std": std},
               "per_prompt": {k: list(map(float, v)) for k, v in per_prompt.items()}, "time_s": 1.0}
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps(metrics))
    return path


def _paired_scores(n=150, shift=2.0, seed=1):
    rng = np.random.default_rng(seed)
    a = rng.uniform(5, 60, size=n)
    b = a + shift + rng.normal(0, 1.0, size=n)
    return a, b


def test_report_table_png_and_comparison(tmp_path):
    a, b = _paired_scores()
    run_a = _fake_run(tmp_path / "sft", {"selfinst": a[:100], "vicuna": a[100:]})
    run_b = _fake_run(tmp_path / "mta", {"selfinst": b[:100], "vicuna": b[100:]})
    out = tmp_path / "out" / "report.md"
    assert _cli(["report", str(run_a), str(run_b), "--out", str(out), "--compare", "sft", "mta",
                 "--bootstrap", "2000"]) == 0
    md = out.read_text()
    assert "| run | selfinst | vicuna | average |" in md
    sft_mean = np.mean(a[:100])
    assert f"| sft | {sft_mean:.2f} ± 1.00 |" in md and "| mta |" in md
    assert "mta − sft" in md and "**all sets pooled** | 150 |" in md
    png = tmp_path / "out" / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_names_option_and_missing_set(tmp_path):
    r1 = _fake_run(tmp_path / "one", {"x": [1.0, 2.0], "y": [3.0]})
    r2 = _fake_run(tmp_path / "two", {"x": [2.0, 2.0]})
    out = tmp_path / "r.md"
    _cli(["report", str(r1), str(r2), "--out", str(out), "--names", "A", "B"])
    md = out.read_text()
    assert "| A | 1.50 ± 1.00 | 3.00 ± 1.00 |" in md
    assert "| B | 2.00 ± 1.00 | – | 2.00 ± 1.00 * |" in md
    with pytest.raises(ConfigError, match="--names"):
        _cli(["report", str(r1), str(r2), "--out", str(out), "--names", "A"])
    with pytest.raises(ConfigError, match="not among the runs"):
        _cli(["report", str(r1), str(r2), "--out", str(out), "--compare", "one", "three"])
    with pytest.raises(DataError, match="no metrics.json"):
        _cli(["report", str(tmp_path), "--out", str(out)])


def test_bootstrap_covers_known_difference():
    a, b = _paired_scores(n=200, shift=2.0)
    r = paired_bootstrap(a, b, n_resamples=10000)
    assert r["n"] == 200
    assert r["low"] < 2.0 < r["high"]
    assert r["low"] > 0  # excludes 0
    assert r["mean_diff"] == pytest.approx(np.mean(b - a))
    assert paired_bootstrap(a, b, n_resamples=500) == paired_bootstrap(a, b, n_resamples=500)  # fixed seed


def test_bootstrap_no_difference_covers_zero():
    rng = np.random.default_rng(3)
    a = rng.uniform(0, 50, 300)
    b = a + rng.normal(0, 3.0, 300)
    r = paired_bootstrap(a, b, n_resamples=5000)
    assert r["low"] < 0 < r["high"]


def test_compare_per_set_and_pooled_and_mismatch(tmp_path):
    a, b = _paired_scores(n=120)
    ra = json.loads((_fake_run(tmp_path / "a", {"s": a[:60], "t": a[60:]}) / "metrics.json").read_text())
    rb = json.loads((_fake_run(tmp_path / "b", {"s": b[:60], "t": b[60:]}) / "metrics.json").read_text())
    res = compare(ra, rb, n_resamples=2000)
    assert set(res) == {"s", "t", "pooled"} and res["pooled"]["n"] == 120
    for r in res.values():
        assert r["low"] < 2.0 < r["high"] and r["low"] > 0
    rc = json.loads((_fake_run(tmp_path / "c", {"s": b[:59]}) / "metrics.json").read_text())
    with pytest.raises(DataError, match="different numbers of prompts"):
        compare(ra, rc)


def _tf_run(path, nll: dict[str, list[float]], kl: dict[str, list[float]] | None = None, rouge=None):
    """A metrics.json as `mtakd evaluate --metrics [rougeL] nll [kl]` writes it (per-prompt dicts)."""
    sets, per_prompt = {}, {}
    for name, v in nll.items():
        tokens = [10] * len(v)
        sets[name] = {"n": len(v), "prompts_truncated": 0, "tokens": sum(tokens), "nll": float(np.mean(v)),
                      "ppl": float(np.exp(np.mean(v)))}
        per_prompt[name] = {"nll": list(map(float, v)), "tokens": tokens}
        if kl:
            sets[name]["kl"] = float(np.mean(kl[name]))
            per_prompt[name]["kl"] = list(map(float, kl[name]))
        if rouge:
            sets[name].update({"mean": float(np.mean(rouge[name])), "std": 0.5, "per_seed": {}, "empty_generations": 0})
            per_prompt[name]["rougeL"] = list(map(float, rouge[name]))
    avg = {"nll": float(np.mean([s["nll"] for s in sets.values()]))}
    if rouge:
        avg.update(mean=float(np.mean([s["mean"] for s in sets.values()])), std=0.5)
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps({"model": path.name, "protocol": {}, "sets": sets, "average": avg,
                                                   "per_prompt": per_prompt, "time_s": 1.0}))
    return path


def test_report_nll_kl_columns_and_bootstrap(tmp_path):
    """NLL and KL appear as tables; --compare bootstraps them per prompt (here B is lower by 0.3 nats)."""
    a, b = _paired_scores(n=80, shift=-0.3)
    a, b = a / 10, b / 10 + 0.3 - 0.03  # per-prompt NLLs around 0.5-6; b − a ≈ −0.03 ± 0.1
    ra = _tf_run(tmp_path / "skl", {"dolly": a[:40], "sni": a[40:]}, {"dolly": a[:40] / 5, "sni": a[40:] / 5})
    rb = _tf_run(tmp_path / "mta", {"dolly": b[:40] - 0.3, "sni": b[40:] - 0.3},
                 {"dolly": b[:40] / 5, "sni": b[40:] / 5})
    out = tmp_path / "r.md"
    _cli(["report", str(ra), str(rb), "--out", str(out), "--compare", "skl", "mta", "--bootstrap", "2000"])
    md = out.read_text()
    assert "# ROUGE-L" not in md and "# response NLL (nats/token)" in md and "# KL(teacher ‖ model)" in md
    assert f"| skl | {np.mean(a[:40]):.4f} | {np.mean(a[40:]):.4f} |" in md
    assert "mta − skl, response NLL" in md and "mta − skl, KL" in md
    res = compare(report.load_run(ra), report.load_run(rb), n_resamples=2000, metric="nll")
    assert res["pooled"]["mean_diff"] == pytest.approx(np.mean(b - 0.3 - a))
    assert res["pooled"]["high"] < 0  # B's NLL is lower: the interval excludes 0
    assert (tmp_path / "r.png").is_file()
    # a ROUGE-L-only run next to an NLL run: a "–" where a run lacks the metric, the comparison on the shared one
    rr = _fake_run(tmp_path / "old", {"dolly": a[:40], "sni": a[40:]})
    _cli(["report", str(rr), str(ra), "--out", str(out)])
    md = out.read_text()
    assert "| old | – | – | – |" in md and "# ROUGE-L" in md
    with pytest.raises(DataError, match="share no metric"):
        _cli(["report", str(rr), str(ra), "--out", str(out), "--compare", "old", "skl"])


def test_bootstrap_over_seeds_and_prompts():
    """[seeds, prompts]: the interval widens with the seed-to-seed variation a one-seed bootstrap cannot see."""
    rng = np.random.default_rng(5)
    a = rng.uniform(0, 50, size=(3, 200))
    seed_effect = np.array([[-3.0], [0.5], [3.5]])  # the gain depends on the training seed
    b = a + 0.3 + seed_effect + rng.normal(0, 1.0, size=(3, 200))
    two_level = paired_bootstrap(a, b, n_resamples=4000)
    one_seed = paired_bootstrap(a[0], b[0], n_resamples=4000)
    pooled = paired_bootstrap(a.ravel(), b.ravel(), n_resamples=4000)  # treating seeds × prompts as prompts
    assert two_level["seeds"] == 3 and two_level["n"] == 200 and "seeds" not in one_seed
    assert two_level["mean_diff"] == pytest.approx(np.mean(b - a))
    assert two_level["per_seed"] == pytest.approx((b - a).mean(axis=1)) and "per_seed" not in one_seed
    per_seed = (b - a).mean(axis=1)
    half = 4.302653 * per_seed.std(ddof=1) / np.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert two_level["seed_t"] == pytest.approx([per_seed.mean() - half, per_seed.mean() + half], rel=1e-5)
    assert two_level["low"] < 0 < two_level["high"]  # the seed spread covers 0 ...
    assert pooled["low"] > 0  # ... which a bootstrap over prompts only would miss
    assert two_level["high"] - two_level["low"] > 3 * (pooled["high"] - pooled["low"])
    ra = [{"sets": {"s": {}}, "per_prompt": {"s": {"rougeL": list(row)}}} for row in a]
    rb = [{"sets": {"s": {}}, "per_prompt": {"s": {"rougeL": list(row)}}} for row in b]
    res = compare(ra, rb, n_resamples=4000)
    assert res["s"] == two_level and res["pooled"]["seeds"] == 3
    with pytest.raises(DataError, match="as many runs"):
        compare(ra, rb[:2])


def test_weighted_bootstrap_is_the_micro_average_and_matches_a_slow_reference():
    """Per-token metrics: prompts weighted by their tokens, so the mean difference is the difference of the
    micro-averaged set values; the interval equals a plain loop over the same resampled indices."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(5, 1, size=(2, 30)), rng.normal(4.9, 1, size=(2, 30))
    w = rng.integers(1, 129, size=30).astype(float)
    got = paired_bootstrap(a, b, n_resamples=300, weights=w, chunk=7)
    micro = lambda x: (x * w).sum(axis=1) / w.sum()  # noqa: E731  each seed's micro-average
    assert got["mean_diff"] == pytest.approx(np.mean(micro(b) - micro(a)))
    assert got["per_seed"] == pytest.approx(micro(b) - micro(a))
    draws, ref = np.random.default_rng(report.BOOTSTRAP_SEED), []
    for lo in range(0, 300, 7):
        k = min(7, 300 - lo)
        prompts, seeds = draws.integers(0, 30, size=(k, 30)), draws.integers(0, 2, size=(k, 2))
        for i in range(k):
            num = sum(w[p] * (b[s, p] - a[s, p]) for s in seeds[i] for p in prompts[i])
            ref.append(num / (2 * w[prompts[i]].sum()))
    assert [got["low"], got["high"]] == pytest.approx(np.percentile(ref, [2.5, 97.5]))
    assert paired_bootstrap(a, b, n_resamples=300, weights=np.ones(30))["low"] == pytest.approx(
        paired_bootstrap(a, b, n_resamples=300)["low"])
    with pytest.raises(DataError, match="weights"):
        paired_bootstrap(a, b, weights=np.ones(29))


def test_compare_weights_nll_by_tokens_and_needs_equal_tokens(tmp_path):
    ra = _tf_run(tmp_path / "a", {"s": [1.0, 3.0]})
    rb = _tf_run(tmp_path / "b", {"s": [0.0, 3.0]})
    for path, tokens in ((ra, [1, 3]), (rb, [1, 3])):
        m = json.loads((path / "metrics.json").read_text())
        m["per_prompt"]["s"]["tokens"] = tokens
        (path / "metrics.json").write_text(json.dumps(m))
    res = compare(report.load_run(ra), report.load_run(rb), n_resamples=100, metric="nll")
    assert res["s"]["mean_diff"] == pytest.approx(-1.0 / 4)  # (1 token × −1 + 3 tokens × 0) / 4 tokens
    m = json.loads((rb / "metrics.json").read_text())
    m["per_prompt"]["s"]["tokens"] = [2, 3]
    (rb / "metrics.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="different response tokens"):
        compare(report.load_run(ra), report.load_run(rb), n_resamples=100, metric="nll")


def test_stratified_bootstrap_redraws_within_each_set():
    """With strata, every resample keeps each set's prompts: a set-level shift no longer widens the interval."""
    rng = np.random.default_rng(4)
    a = rng.normal(0, 0.1, size=40)
    b = a + np.r_[np.full(20, 1.0), np.full(20, -1.0)] + rng.normal(0, 0.1, size=40)  # the sets differ by 2
    strata = [0] * 20 + [1] * 20
    plain = paired_bootstrap(a, b, n_resamples=2000)
    by_set = paired_bootstrap(a, b, n_resamples=2000, strata=strata)
    assert by_set["mean_diff"] == pytest.approx(plain["mean_diff"])
    assert by_set["high"] - by_set["low"] < 0.2 * (plain["high"] - plain["low"])
    assert paired_bootstrap(a, b, n_resamples=500, strata=[0] * 40)["low"] == pytest.approx(
        paired_bootstrap(a, b, n_resamples=500)["low"])  # one stratum: the plain bootstrap
