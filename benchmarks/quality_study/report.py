"""The study's statistics and report: per-arm tables over training seeds, geometry, paired bootstrap, DIR/report.md."""

from __future__ import annotations

import itertools
import json
import os
import platform
from pathlib import Path

import numpy as np

from .plan import BUDGETS, COMPARISONS, GEOMETRY_SAMPLES, GRANULARITY, STUDENTS, budget_summary, unit_dir
from .steps import _fmt_s, merge_unit_metrics, step_history

SAMPLED_TITLE = "ROUGE-L, sampled (the paper's protocol)"


def machine() -> dict:
    import torch

    from mtakd.run import versions

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(), "platform": platform.platform(), "versions": versions()}


def arm_runs(units, out: Path, sampled: bool = False) -> dict[str, dict[int | None, dict]]:
    """{row label: {training seed: merged metrics}} of every unit with a finished evaluation (``sampled``: of
    its sampled ROUGE-L steps)."""
    from mtakd.report import load_run

    runs: dict = {}
    for row, seed, _ in units:
        d = unit_dir(out, row, seed)
        if merge_unit_metrics(d, sampled) is not None:
            runs.setdefault(row.label, {})[seed] = load_run(d / "eval" / ("sampled" if sampled else ""))
    return runs


def _value(m: dict, metric: str) -> float | None:
    """A set's value of ``metric``; ``empty``: the % of generations that were empty (ROUGE-L 0 by definition)."""
    if metric == "empty":
        return None if "empty_generations" not in m else 100 * m["empty_generations"] / (m["n"] * len(m["per_seed"]))
    return m.get("mean" if metric == "rougeL" else metric)


def _average(m: dict, metric: str, sets: list[str]) -> float | None:
    """A unit's average over ``sets`` (None until it has every set: mid-study, some are still running)."""
    vals = [_value(m["sets"].get(s, {}), metric) for s in sets]
    if None in vals:
        return None
    return float(np.mean(vals)) if metric == "empty" else _value(m["average"], metric)


def seeds_table(runs: dict, metric: str) -> str:
    """Arms × (sets + average): mean ± sample std over training seeds of each seed's set value."""
    from mtakd.report import set_names

    sets = set_names({f"{a}/{s}": m for a, by_seed in runs.items() for s, m in by_seed.items()})
    lines = ["| arm | seeds | " + " | ".join(sets) + " | average |", "|---|---:|" + "---:|" * (len(sets) + 1)]
    fmt = {"rougeL": ".2f", "empty": ".0f"}.get(metric, ".4f")
    for arm, by_seed in runs.items():
        cells = []
        for s in sets + ["average"]:
            vals = [_value(m["sets"].get(s, {}), metric) if s != "average" else _average(m, metric, sets)
                    for m in by_seed.values()]
            vals = [v for v in vals if v is not None]
            cells.append("–" if not vals else f"{np.mean(vals):{fmt}}"
                         + (f" ± {np.std(vals, ddof=1):{fmt}}" if len(vals) > 1 else "")
                         + (f" ({len(vals)} seeds)" if len(vals) < len(by_seed) else ""))
        lines.append(f"| {arm} | {len(by_seed)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def key_layer_dsa(trajectory_json: Path, student: str) -> dict[str, list[float]]:
    """{trajectory student name (initial / mid / end): L_DSA at each key layer of ``student``}: the mean over the
    dev examples at the key layer's own granularity with importance weights, as the training loss has it."""
    result = json.loads(trajectory_json.read_text())
    keys = [s for s, _ in STUDENTS[student]["key_layers"]]
    out = {}
    for name, st in result["students"].items():
        by_layer = {layer["student"]: layer["metrics"] for layer in st["layers"]}
        out[name] = [by_layer[k][f"dsa_{g}_importance"]["mean"] for k, g in zip(keys, GRANULARITY)]
    return out


def geometry_by_arm(units, out: Path, student: str) -> dict[str, dict[str, list[float]]]:
    """{arm: {initial / mid / end: [mean L_DSA over the key layers, one per training seed]}} (dev, importance
    weights); the per-layer values of the end students under ``end_layers``."""
    rows: dict[str, dict[str, list]] = {}
    for row, seed, _ in units:
        path = unit_dir(out, row, seed) / "geometry" / "trajectory.json"
        if path.is_file():
            for name, vals in key_layer_dsa(path, student).items():
                by = rows.setdefault(row.label, {})
                by.setdefault(name, []).append(float(np.mean(vals)))
                if name == "end":
                    by.setdefault("end_layers", []).append(vals)
    init = rows.pop("student (initial)", {}).get("initial")
    for by in rows.values():
        by["initial"] = init or []
    return rows


def geometry_table(geo: dict, student: str) -> str | None:
    """Arms × (initial, mid-way, end): mean L_DSA over the key layers (:func:`geometry_by_arm`), mean ± std over
    training seeds; and each key layer at the end."""
    if not geo:
        return None
    keys = [s for s, _ in STUDENTS[student]["key_layers"]]
    cell = lambda v: "–" if not v else f"{np.mean(v):.4f}" + (f" ± {np.std(v, ddof=1):.4f}" if len(v) > 1 else "")  # noqa: E731
    lines = ["| arm | seeds | initial | mid-way | end | " + " | ".join(f"end S{k}" for k in keys) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(keys)]
    for arm, by in geo.items():
        ends = by.get("end_layers", [])
        lines.append(f"| {arm} | {len(ends)} | {cell(by['initial'])} | {cell(by.get('mid', []))} | "
                     f"{cell(by.get('end', []))} | " + " | ".join(cell([v[i] for v in ends]) for i in range(len(keys))) + " |")
    return "\n".join(lines) + "\n"


def write_report(budget: str, out: Path, units, command: str, n_resamples: int = 10000,
                 overrides: list[str] | None = None) -> str | None:
    """DIR/report.md and DIR/summary.json from every finished unit: a table per metric (mean ± std over
    training seeds), and for each MTA − base pair the paired bootstrap over training seeds and prompts."""
    from mtakd.report import METRICS as NAMES
    from mtakd.report import compare, comparison_table, excludes_zero, run_metrics

    runs, sampled = arm_runs(units, out), arm_runs(units, out, sampled=True)
    if not runs and not sampled:
        print("no finished evaluation: no report")
        return None
    present = [k for k in NAMES if any(k in run_metrics(m) for by in runs.values() for m in by.values())]
    parts = [f"# Quality ({budget})", "",
             "Each cell: mean ± sample std over training seeds of the set value (ROUGE-L: the mean over "
             "prompts and sampling seeds; NLL / KL: per response token, micro-averaged over the set); *average*: "
             "the mean of the set values.", ""]
    if BUDGETS[budget].get("student") == "random":
        parts += [f"*student (initial)* is the random initialisation of seed {BUDGETS[budget]['training']['seed']}; "
                  "each trained arm starts from the initialisation of its own training seed.", ""]
    if BUDGETS[budget].get("student") == "pretrained":
        parts += ["*student (initial)* is the independently trained student (a random init trained with SFT on "
                  "alpaca5k.jsonl, no teacher: configs/bench-pretrained-student.yaml); every arm starts from it.", ""]
    for k in present:
        parts += [f"## {NAMES[k]}", "", seeds_table(runs, k)]
        if k == "rougeL":
            parts += ["Empty generations (nothing but whitespace before the end-of-turn; ROUGE-L 0), % of prompts:", "",
                      seeds_table(runs, "empty")]
    if sampled:
        parts += [f"## {SAMPLED_TITLE}", "", "The paper's protocol (MTA_SPEC §8): responses sampled at temperature 1, "
                  "top-p 1, no top-k, ROUGE-L F1 × 100 averaged over the sampling seeds 10, 20, 30, 40, 50 and the "
                  "prompts of each set; the same cells as above over training seeds.", "", seeds_table(sampled, "rougeL"),
                  "Empty generations, % of prompts × sampling seeds:", "", seeds_table(sampled, "empty")]
    student = BUDGETS[budget].get("student", "selected")
    geometry = geometry_by_arm(units, out, student)
    geo = geometry_table(geometry, student)
    if geo:
        keys = ", ".join(f"S{s}→T{t} {g}" for (s, t), g in zip(STUDENTS[student]["key_layers"], GRANULARITY))
        parts += ["## Geometry: L_DSA at the key layers (dev, importance weights)", "",
                  f"Key layers {keys}; every arm measured with the same layer map (`mtakd trajectory`, "
                  f"{GEOMETRY_SAMPLES} dev records); mean over the key layers, mean ± sample std over training seeds.", "", geo]
    comparisons, headline, details = {}, [], []
    variants = ((runs, present, ""), (sampled, ["rougeL"], " (sampled)"))
    for (a, b), (arms, metrics, suffix) in itertools.product(COMPARISONS, variants):
        if a not in arms or b not in arms:
            continue
        seeds = [s for s in arms[a] if s in arms[b]]
        for k in metrics:
            ra, rb = [arms[a][s] for s in seeds], [arms[b][s] for s in seeds]
            if not seeds or not all(k in run_metrics(m) for m in ra + rb):
                continue
            result = compare(ra, rb, n_resamples, metric=k)
            comparisons.setdefault(f"{b} − {a}", {})[k + suffix] = {"seeds": seeds, **result}
            r, f = result["pooled"], (".2f" if k == "rougeL" else ".4f")
            per_seed = ", ".join(f"{v:+{f}}" for v in r.get("per_seed", [r["mean_diff"]]))
            t = r.get("seed_t")
            headline.append(f"| {b} − {a} | {NAMES[k]}{suffix} | {', '.join(map(str, seeds))} | {r['n']} | "
                            f"{r['mean_diff']:+{f}} | {per_seed} | [{r['low']:+{f}}, {r['high']:+{f}}] | "
                            f"{'yes' if excludes_zero((r['low'], r['high'])) else 'no'} | "
                            + ("–" if t is None else f"[{t[0]:+{f}}, {t[1]:+{f}}] "
                               f"{'yes' if excludes_zero(t) else 'no'}") + " |")
            details += [f"### {b} − {a}: {NAMES[k]}{suffix} (training seeds {', '.join(map(str, seeds))})", "",
                        comparison_table(a, b, result, n_resamples, k)]
    if headline:
        parts += ["## MTA − base (an ablation − SKL+MTA), all prompts of the sets pooled", "",
                  "Paired bootstrap over training seeds and prompts (per set below); NLL and KL: lower is better, "
                  "prompts weighted by their response tokens (the micro-average over every scored token, which "
                  "differs slightly from the tables' *average*, a mean over sets). *t over seeds*: the 95 % "
                  "t-interval of the per-seed differences (mean ± t·sd/√S), the stricter bound when seeds are few: "
                  "the bootstrap can only redraw the seeds it has.", "",
                  "| comparison | metric | training seeds | prompts | mean difference | per training seed | 95% CI "
                  "| CI excludes 0 | t over seeds, excludes 0 |", "|---|---|---|---:|---:|---|---|---|---|",
                  *headline, "", *details]
    hist = step_history(out)
    lines = ["| step kind | finished steps | mean | total |", "|---|---:|---:|---:|"]
    for kind, v in hist.items():
        lines.append(f"| {kind} | {len(v)} | {_fmt_s(sum(v) / len(v))} | {_fmt_s(sum(v))} |")
    m = machine()
    cfg0 = units[0][2]
    parts += ["## Wall times (every invocation)", "", *lines, "", "## Setup", "",
              f"- command: `{command}`", f"- budget `{budget}`: {budget_summary(budget)}",
              *([f"- `--set` overrides, replacing the budget's values above: {', '.join(overrides)}"] if overrides else []),
              f"- training seeds: {sorted({s for _, s, _ in units if s is not None})}",
              f"- eval sets: {', '.join(cfg0.eval.data)}",
              f"- machine: {m['cpu']}, {m['cpu_count']} CPUs, torch threads {m['torch_threads']}, CUDA {m['cuda']}; "
              f"{m['platform']}",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()), ""]
    losses = sorted(p.relative_to(out) for p in out.glob("*/seed*/losses.png"))
    if losses:
        parts += ["## Training loss curves", "", *[f"- [{p.parent}]({p})" for p in losses], ""]
    report = "\n".join(parts)
    (out / "report.md").write_text(report)
    arms = lambda runs: {arm: {str(s): {"average": r["average"], "sets": r["sets"]} for s, r in by.items()}  # noqa: E731
                         for arm, by in runs.items()}
    summary = {"budget": budget, "summary": budget_summary(budget), "command": command, "machine": m,
               "comparisons": comparisons, "arms": arms(runs), "arms_sampled": arms(sampled), "geometry": geometry}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return report


# a unit's files that are results (small, no weights, generations or dataset text), relative to the unit
EXPORTED = ("row.json", "timing.json", "train/log_history.json", "train/mtakd_run.json", "geometry/trajectory.json",
            "eval/**/metrics.json")


def export_results(budget: str, out: Path, units, root: Path) -> int:
    """Copy a study's results for committing: the :data:`EXPORTED` files of every unit that is not still training,
    and ``steps.jsonl``, into ``root/units/<budget>/`` (the study's layout); ``report.md`` and ``summary.json`` into
    ``root/<budget>/``. Returns the number of files copied."""
    import shutil

    pairs = [(out / f, root / budget / f) for f in ("report.md", "summary.json")]
    pairs.append((out / "steps.jsonl", root / "units" / budget / "steps.jsonl"))
    for row, seed, _ in units:
        d = unit_dir(out, row, seed)
        if row.kind == "train" and not (d / "timing.json").is_file():
            continue  # still training (timing.json is written when training ends)
        for pattern in EXPORTED:
            pairs += [(f, root / "units" / budget / f.relative_to(out)) for f in d.glob(pattern)]
    copied = 0
    for src, dst in pairs:
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            copied += 1
    return copied
