"""`mtakd report`: one markdown table and a bar chart over several `mtakd evaluate` runs, and an optional
paired bootstrap comparison of two of them.

The table has one row per run and one column per set plus the average, each "mean ± std over seeds".
The chart (``<out>.png`` next to the markdown file) shows the same numbers with std error bars.

``--compare A B`` resamples *prompts* with replacement (paired: the same prompts for both runs) using
the seed-averaged per-prompt ROUGE-L of ``metrics.json``'s ``per_prompt``, and reports the mean
difference B − A with its 95 % percentile interval, per set and over all prompts of all sets pooled (so
the pooled row weights sets by their size, unlike the unweighted "average" column). The RNG seed is
fixed, so a report is reproducible.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .config import ConfigError
from .data import DataError

log = logging.getLogger(__name__)

BOOTSTRAP_SEED = 0


def load_run(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise DataError(f"{run_dir}: no metrics.json (not an `mtakd evaluate` output directory)")
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(metrics, dict) or not isinstance(metrics.get("sets"), dict) or "average" not in metrics:
        raise DataError(f"{path}: expected the `sets` and `average` fields written by `mtakd evaluate`")
    return metrics


def set_names(runs: dict[str, dict]) -> list[str]:
    """Sets in order of first appearance over the runs."""
    names: list[str] = []
    for m in runs.values():
        names += [s for s in m["sets"] if s not in names]
    return names


def _cell(m: dict | None) -> str:
    return "–" if m is None else f"{m['mean']:.2f} ± {m['std']:.2f}"


def results_table(runs: dict[str, dict]) -> str:
    sets = set_names(runs)
    lines = ["| run | " + " | ".join(sets) + " | average |", "|---|" + "---:|" * (len(sets) + 1)]
    for name, m in runs.items():
        cells = [_cell(m["sets"].get(s)) for s in sets]
        # a run missing a set has an average over fewer sets: say so instead of comparing it silently
        avg = _cell(m["average"]) + ("" if len(m["sets"]) == len(sets) else " *")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {avg} |")
    if any(len(m["sets"]) != len(sets) for m in runs.values()):
        lines += ["", "\\* average over the sets this run has."]
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict], path: str | Path) -> None:
    """Grouped bars (sets + average) per run with ± std error bars, written with the Agg backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = set_names(runs) + ["average"]
    width = 0.8 / len(runs)
    fig = Figure(figsize=(max(5.0, 1.5 + len(groups) * (0.5 + 0.4 * len(runs))), 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(len(groups))
    for k, (name, m) in enumerate(runs.items()):
        cells = [m["sets"].get(g) if g != "average" else m["average"] for g in groups]
        means = [c["mean"] if c else np.nan for c in cells]
        stds = [c["std"] if c else 0.0 for c in cells]
        ax.bar(x + (k - (len(runs) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=name)
    ax.set_xticks(x, groups)
    ax.set_ylabel("ROUGE-L (mean ± std over seeds)")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------------- bootstrap
def paired_bootstrap(a, b, n_resamples: int = 10000, seed: int = BOOTSTRAP_SEED, chunk: int = 1000) -> dict:
    """Mean of B − A over paired items and its 95 % percentile interval from resampling items."""
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    if d.ndim != 1 or len(d) == 0:
        raise DataError("paired bootstrap needs two equally long, non-empty score lists")
    if n_resamples < 1:
        raise ConfigError(f"--bootstrap must be positive, got {n_resamples}")
    rng = np.random.default_rng(seed)
    means = np.concatenate([
        d[rng.integers(0, len(d), size=(min(chunk, n_resamples - i), len(d)))].mean(axis=1)
        for i in range(0, n_resamples, chunk)
    ])
    low, high = np.percentile(means, [2.5, 97.5])
    return {"n": len(d), "mean_diff": float(d.mean()), "low": float(low), "high": float(high)}


def compare(run_a: dict, run_b: dict, n_resamples: int = 10000, seed: int = BOOTSTRAP_SEED) -> dict:
    """Paired bootstrap of B − A per shared set and over all their prompts pooled."""
    shared = [s for s in run_a["sets"] if s in run_b["sets"]]
    if not shared:
        raise DataError("the two runs share no evaluation set")
    result, all_a, all_b = {}, [], []
    for s in shared:
        try:
            a, b = run_a["per_prompt"][s], run_b["per_prompt"][s]
        except KeyError as e:
            raise DataError(f"set {s!r}: metrics.json has no per-prompt scores") from e
        if len(a) != len(b):
            raise DataError(f"set {s!r}: the runs scored different numbers of prompts ({len(a)} vs {len(b)})")
        result[s] = paired_bootstrap(a, b, n_resamples, seed)
        all_a += a
        all_b += b
    result["pooled"] = paired_bootstrap(all_a, all_b, n_resamples, seed)
    return result


def comparison_table(name_a: str, name_b: str, result: dict, n_resamples: int) -> str:
    lines = [
        f"Paired bootstrap over prompts ({n_resamples} resamples, seed {BOOTSTRAP_SEED}): "
        f"{name_b} − {name_a}, ROUGE-L points.",
        "",
        "| set | n | mean difference | 95% interval | interval excludes 0 |",
        "|---|---:|---:|---|---|",
    ]
    for s, r in result.items():
        label = "**all sets pooled**" if s == "pooled" else s
        sig = "yes" if r["low"] > 0 or r["high"] < 0 else "no"
        lines.append(f"| {label} | {r['n']} | {r['mean_diff']:+.2f} | [{r['low']:+.2f}, {r['high']:+.2f}] | {sig} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ CLI
def build_report(run_dirs, out, names=None, compare_names=None, n_resamples: int = 10000) -> str:
    names = list(names) if names else [Path(d).resolve().name for d in run_dirs]
    if len(names) != len(run_dirs):
        raise ConfigError(f"report: {len(run_dirs)} run directories but {len(names)} --names")
    if len(set(names)) != len(names):
        raise ConfigError(f"report: run names must be distinct, got {names} (use --names)")
    runs = {name: load_run(d) for name, d in zip(names, run_dirs)}
    out = Path(out)
    png = out.with_suffix(".png")
    parts = ["# ROUGE-L", "", "Mean ± std over seeds.", "", results_table(runs), f"![ROUGE-L]({png.name})", ""]
    if compare_names:
        a, b = compare_names
        missing = [n for n in (a, b) if n not in runs]
        if missing:
            raise ConfigError(f"report: --compare names {missing} are not among the runs {names}")
        parts += ["## Comparison", "", comparison_table(a, b, compare(runs[a], runs[b], n_resamples), n_resamples)]
    text = "\n".join(parts)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    plot(runs, png)
    return text


def main_report(args) -> int:
    text = build_report(args.run_dirs, args.out, args.names, args.compare, args.bootstrap)
    print(text)
    print(f"written {args.out} and {Path(args.out).with_suffix('.png')}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="table + bar chart over `mtakd evaluate` runs, optional paired bootstrap comparison",
        description="Read RUN_DIR/metrics.json of each run; write a markdown table and a PNG bar chart "
        "(next to --out); with --compare A B a paired bootstrap over prompts of B − A.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output directories of `mtakd evaluate`")
    p.add_argument("--out", required=True, metavar="report.md")
    p.add_argument("--names", nargs="+", help="run names (default: the directory names)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="paired bootstrap of B − A")
    p.add_argument("--bootstrap", type=int, default=10000, metavar="N", help="bootstrap resamples (default 10000)")
    p.set_defaults(func=main_report)
