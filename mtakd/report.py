"""`mtakd report`: markdown tables and a bar chart over several `mtakd evaluate` runs, and an optional
paired bootstrap comparison of two of them.

One table per metric the runs have (ROUGE-L; the teacher-forced response NLL and KL(teacher ‖ model) of
``mtakd evaluate --metrics nll kl``), with one row per run and one column per set plus the average: ROUGE-L
as "mean ± std over seeds", NLL (nats per token, micro-averaged over a set's response tokens) and KL as
single values. The chart (``<out>.png`` next to the markdown file) shows ROUGE-L with std error bars (the
NLL when no run has ROUGE-L).

``--compare A B`` resamples *prompts* with replacement (paired: the same prompts for both runs) using the
per-prompt values of ``metrics.json``'s ``per_prompt`` (ROUGE-L averaged over seeds; each prompt's NLL
and KL per token), and reports the mean difference B − A with its 95 % percentile interval for every metric
both runs have, per set and over all prompts of all sets pooled (so the pooled row weights sets by their
size, unlike the unweighted "average" column; and the per-prompt NLL mean weights prompts, not tokens).
For NLL and KL lower is better. :func:`paired_bootstrap` also takes ``[training seeds, prompts]`` arrays:
it then resamples both seeds and prompts (used by ``benchmarks/quality.py`` for arms trained with several
seeds). The RNG seed is fixed, so a report is reproducible.
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
METRICS = {"rougeL": "ROUGE-L", "nll": "response NLL (nats/token)", "kl": "KL(teacher ‖ model)"}
PER_TOKEN = ("nll", "kl")  # per-prompt values are means over the response's tokens: compared token-weighted


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
    # runs written before the teacher-forced metrics hold a list of per-prompt ROUGE-L scores per set
    metrics["per_prompt"] = {s: v if isinstance(v, dict) else {"rougeL": v}
                             for s, v in (metrics.get("per_prompt") or {}).items()}
    return metrics


def run_metrics(m: dict) -> list[str]:
    """The metrics a run has: rougeL when its sets carry mean/std, nll / kl when they carry those."""
    found = []
    for key, field in (("rougeL", "mean"), ("nll", "nll"), ("kl", "kl")):
        if m["sets"] and all(field in s for s in m["sets"].values()):
            found.append(key)
    return found


def set_names(runs: dict[str, dict]) -> list[str]:
    """Sets in order of first appearance over the runs."""
    names: list[str] = []
    for m in runs.values():
        names += [s for s in m["sets"] if s not in names]
    return names


def _cell(m: dict | None, metric: str = "rougeL") -> str:
    if metric == "rougeL":
        return "–" if m is None or "mean" not in m else f"{m['mean']:.2f} ± {m['std']:.2f}"
    return "–" if m is None or metric not in m else f"{m[metric]:.4f}"


def results_table(runs: dict[str, dict], metric: str = "rougeL") -> str:
    """Runs × (sets + average) for one metric; "–" where a run lacks the set or the metric."""
    sets = set_names(runs)
    lines = ["| run | " + " | ".join(sets) + " | average |", "|---|" + "---:|" * (len(sets) + 1)]
    for name, m in runs.items():
        cells = [_cell(m["sets"].get(s), metric) for s in sets]
        # a run missing a set has an average over fewer sets: say so instead of comparing it silently
        avg = _cell(m["average"], metric) + ("" if len(m["sets"]) == len(sets) else " *")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {avg} |")
    if any(len(m["sets"]) != len(sets) for m in runs.values()):
        lines += ["", "\\* average over the sets this run has."]
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict], path: str | Path, metric: str = "rougeL") -> None:
    """Grouped bars (sets + average) per run (ROUGE-L with ± std error bars, or ``metric``), Agg backend."""
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
        key = "mean" if metric == "rougeL" else metric
        means = [c[key] if c and key in c else np.nan for c in cells]
        stds = [c["std"] if c and metric == "rougeL" and "std" in c else 0.0 for c in cells]
        ax.bar(x + (k - (len(runs) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=name)
    ax.set_xticks(x, groups)
    ax.set_ylabel("ROUGE-L (mean ± std over seeds)" if metric == "rougeL" else METRICS[metric])
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------------- bootstrap
def paired_bootstrap(a, b, n_resamples: int = 10000, seed: int = BOOTSTRAP_SEED, chunk: int = 1000,
                     weights=None, strata=None) -> dict:
    """Mean of B − A over paired items and its 95 % percentile interval from resampling items.

    ``a`` and ``b`` are per-prompt values ``[prompts]``, or ``[training seeds, prompts]`` for arms trained
    with several seeds (row s of A paired with row s of B: same seed, same prompts). With seeds, each
    resample draws seeds and prompts with replacement (a two-level bootstrap), so the interval accounts for
    both the training-seed and the prompt variation; ``n`` is the number of prompts, ``seeds`` the number
    of seeds, ``per_seed`` each seed's mean difference and ``seed_t`` the t-interval over those means
    (mean ± t₀.₉₇₅,S−1 · sd / √S): with a handful of seeds the bootstrap, which can only draw from the seeds
    it has, understates their spread, and the t-interval is the more honest bound on the seed variation.
    ``weights`` ``[prompts]`` (e.g. each response's token count, for a per-token metric averaged per prompt):
    every mean is then the weighted one, Σ w·d / Σ w, the micro-average of the per-set tables. ``strata``
    ``[prompts]`` (e.g. each prompt's evaluation set): prompts are redrawn within their stratum, so every
    resample keeps each set's size.
    """
    from scipy import stats

    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    if d.ndim == 1:
        d = d[None]
    if d.ndim != 2 or d.size == 0:
        raise DataError("paired bootstrap needs two equally shaped, non-empty score arrays ([prompts] or "
                        "[seeds, prompts])")
    if n_resamples < 1:
        raise ConfigError(f"--bootstrap must be positive, got {n_resamples}")
    n_seeds, n = d.shape
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != (n,) or (w < 0).any() or w.sum() <= 0:
        raise DataError(f"paired bootstrap: weights must be {n} non-negative values, not all zero")
    groups = [np.arange(n)] if strata is None else [np.flatnonzero(np.asarray(strata) == g) for g in np.unique(strata)]
    rng = np.random.default_rng(seed)
    means = []
    for i in range(0, n_resamples, chunk):
        k = min(chunk, n_resamples - i)
        prompts = np.concatenate([g[rng.integers(0, len(g), size=(k, len(g)))] for g in groups], axis=1)
        seeds = rng.integers(0, n_seeds, size=(k, n_seeds)) if n_seeds > 1 else np.zeros((k, 1), dtype=int)
        wk = w[prompts]  # [k, n]
        means.append((d[seeds[:, :, None], prompts[:, None, :]] * wk[:, None, :]).sum(axis=(1, 2))
                     / (wk.sum(axis=1) * n_seeds))
    low, high = np.percentile(np.concatenate(means), [2.5, 97.5])
    per_seed = d @ w / w.sum()
    out = {"n": n, "mean_diff": float(per_seed.mean()), "low": float(low), "high": float(high)}
    if n_seeds > 1:
        half = stats.t.ppf(0.975, n_seeds - 1) * per_seed.std(ddof=1) / np.sqrt(n_seeds)
        out.update(seeds=n_seeds, per_seed=per_seed.tolist(),
                   seed_t=[float(per_seed.mean() - half), float(per_seed.mean() + half)])
    return out


def _per_prompt(runs, s: str, metric: str) -> np.ndarray:
    """[len(runs), prompts] per-prompt values of one set and metric (one row per run, e.g. training seed)."""
    rows = []
    for run in runs:
        try:
            values = run["per_prompt"][s]
            rows.append((values if isinstance(values, dict) else {"rougeL": values})[metric])  # (older runs: a list)
        except KeyError as e:
            raise DataError(f"set {s!r}: metrics.json has no per-prompt {metric} values") from e
    if len({len(r) for r in rows}) != 1:
        raise DataError(f"set {s!r}: the runs scored different numbers of prompts ({', '.join(str(len(r)) for r in rows)})")
    return np.asarray(rows, dtype=float)


def compare(run_a, run_b, n_resamples: int = 10000, seed: int = BOOTSTRAP_SEED, metric: str = "rougeL") -> dict:
    """Paired bootstrap of B − A of ``metric`` per shared set and over all their prompts pooled.

    ``run_a`` / ``run_b`` are loaded runs, or lists of runs (one per training seed, paired in order: a
    two-level bootstrap over seeds and prompts, see :func:`paired_bootstrap`). Per-token metrics (NLL, KL) are
    weighted by each prompt's response tokens, so a set's mean difference is the difference of its micro-averaged
    values, and ``pooled`` the micro-average over every token of every shared set."""
    runs_a = run_a if isinstance(run_a, list) else [run_a]
    runs_b = run_b if isinstance(run_b, list) else [run_b]
    if len(runs_a) != len(runs_b):
        raise DataError(f"paired comparison over training seeds needs as many runs on each side ({len(runs_a)} vs "
                        f"{len(runs_b)})")
    shared = [s for s in runs_a[0]["sets"] if all(s in r["sets"] for r in runs_a + runs_b)]
    if not shared:
        raise DataError("the two runs share no evaluation set")
    result, all_a, all_b, all_w, strata = {}, [], [], [], []
    for s in shared:
        a, b = _per_prompt(runs_a, s, metric), _per_prompt(runs_b, s, metric)
        if a.shape != b.shape:
            raise DataError(f"set {s!r}: the runs scored different numbers of prompts ({a.shape[1]} vs {b.shape[1]})")
        w = _token_weights(runs_a + runs_b, s) if metric in PER_TOKEN else np.ones(a.shape[1])
        result[s] = paired_bootstrap(a, b, n_resamples, seed, weights=w)
        all_a.append(a)
        all_b.append(b)
        all_w.append(w)
        strata += [len(all_w)] * len(w)
    result["pooled"] = paired_bootstrap(np.concatenate(all_a, 1), np.concatenate(all_b, 1), n_resamples, seed,
                                        weights=np.concatenate(all_w), strata=strata)  # prompts redrawn per set
    return result


def _token_weights(runs, s: str) -> np.ndarray:
    """Each prompt's scored response tokens in set ``s`` (the same in every run: one tokenizer, one reference)."""
    tokens = _per_prompt(runs, s, "tokens")
    if not (tokens == tokens[0]).all():
        raise DataError(f"set {s!r}: the runs scored different response tokens per prompt (another tokenizer or "
                        "max_response_length?); their per-token values cannot be paired")
    return tokens[0]


def excludes_zero(interval) -> bool:
    return interval[0] > 0 or interval[1] < 0


def comparison_table(name_a: str, name_b: str, result: dict, n_resamples: int, metric: str = "rougeL") -> str:
    unit = {"rougeL": "ROUGE-L points", "nll": "response NLL, nats per token (lower is better)",
            "kl": "KL(teacher ‖ model) per token (lower is better)"}[metric]
    seeds = next(iter(result.values())).get("seeds")
    over = f"training seeds ({seeds}) and prompts" if seeds else "prompts"
    weighted = " Prompts weighted by their response tokens (the micro-average of the tables)." if metric in PER_TOKEN else ""
    lines = [
        f"Paired bootstrap over {over} ({n_resamples} resamples, seed {BOOTSTRAP_SEED}): "
        f"{name_b} − {name_a}, {unit}.{weighted}"
        + (" *t over seeds*: mean ± t·sd/√S of the per-seed differences." if seeds else ""),
        "",
        "| set | n | mean difference | 95% interval | interval excludes 0 |" + (" per seed | t over seeds |" if seeds else ""),
        "|---|---:|---:|---|---|" + ("---|---|" if seeds else ""),
    ]
    f = ".2f" if metric == "rougeL" else ".4f"
    for s, r in result.items():
        label = "**all sets pooled**" if s == "pooled" else s
        row = (f"| {label} | {r['n']} | {r['mean_diff']:+{f}} | [{r['low']:+{f}}, {r['high']:+{f}}] | "
               f"{'yes' if excludes_zero((r['low'], r['high'])) else 'no'} |")
        if seeds:
            lo, hi = r["seed_t"]
            row += (f" {', '.join(f'{v:+{f}}' for v in r['per_seed'])} | [{lo:+{f}}, {hi:+{f}}]"
                    f"{' excludes 0' if excludes_zero(r['seed_t']) else ''} |")
        lines.append(row)
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
    present = [k for k in METRICS if any(k in run_metrics(m) for m in runs.values())]
    if not present:
        raise DataError("report: the runs have no ROUGE-L, NLL or KL values")
    parts = []
    for k in present:
        if k == "rougeL":
            parts += ["# ROUGE-L", "", "Mean ± std over seeds.", "", results_table(runs), f"![ROUGE-L]({png.name})", ""]
        else:
            note = ("Teacher-forced, nats per token of the reference response (+ end of turn); a set's value is "
                    "total nats / total tokens." if k == "nll" else
                    "Mean over the reference's response positions of KL(teacher ‖ model) over the tokenizer's ids.")
            parts += [f"# {METRICS[k]}", "", note, "", results_table(runs, k), ""]
            if "rougeL" not in present and k == "nll":
                parts += [f"![NLL]({png.name})", ""]
    if compare_names:
        a, b = compare_names
        missing = [n for n in (a, b) if n not in runs]
        if missing:
            raise ConfigError(f"report: --compare names {missing} are not among the runs {names}")
        shared = [k for k in present if k in run_metrics(runs[a]) and k in run_metrics(runs[b])]
        if not shared:
            raise DataError(f"report: {a} and {b} share no metric to compare")
        parts += ["## Comparison", ""]
        for k in shared:
            parts += [comparison_table(a, b, compare(runs[a], runs[b], n_resamples, metric=k), n_resamples, k)]
    text = "\n".join(parts)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    plot(runs, png, "rougeL" if "rougeL" in present else present[0])
    return text


def main_report(args) -> int:
    text = build_report(args.run_dirs, args.out, args.names, args.compare, args.bootstrap)
    print(text)
    print(f"written {args.out} and {Path(args.out).with_suffix('.png')}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="tables + bar chart over `mtakd evaluate` runs (ROUGE-L, NLL, KL), optional paired bootstrap",
        description="Read RUN_DIR/metrics.json of each run; write a markdown table per metric (ROUGE-L, "
        "response NLL, KL to the teacher) and a PNG bar chart (next to --out); with --compare A B a paired "
        "bootstrap over prompts of B − A for every metric both runs have.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output directories of `mtakd evaluate`")
    p.add_argument("--out", required=True, metavar="report.md")
    p.add_argument("--names", nargs="+", help="run names (default: the directory names)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="paired bootstrap of B − A")
    p.add_argument("--bootstrap", type=int, default=10000, metavar="N", help="bootstrap resamples (default 10000)")
    p.set_defaults(func=main_report)
