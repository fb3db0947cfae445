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
