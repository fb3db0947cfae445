"""The cross-regime table (issue 26): per regime of the study (its summary.json) and per base/MTA pair, where the
student's geometry starts, how far MTA moved it, and what MTA gained in NLL and ROUGE-L."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mtakd.report import excludes_zero

from .plan import COMPARISONS, REPO
from .steps import STEP_LOG, step_history

RESULTS = REPO / "benchmarks" / "results" / "quality-study"
REGIMES = {"(a) pruned": "pruned", "(b) random": "random", "(c) pretrained": "pretrained"}
PAIRS = [(a, b) for a, b in COMPARISONS if b == f"{a}+MTA"]


def _diff(c: dict | None, fmt: str) -> str:
    """``mean [t-interval over seeds]``, bold when that interval excludes 0; – when not measured."""
    if not c:
        return "–"
    r = c["pooled"]
    t = r.get("seed_t")
    text = f"{r['mean_diff']:+{fmt}}" + ("" if t is None else f" [{t[0]:+{fmt}}, {t[1]:+{fmt}}]")
    return f"**{text}**" if t is not None and excludes_zero(t) else text


def regimes_table(root: Path = RESULTS) -> str:
    """Markdown: one row per (regime, pair) with both arms measured; regimes without a summary are left out."""
    lines = ["| regime | initial L_DSA | pair | seeds | end L_DSA, base → MTA | MTA − base: NLL | ROUGE-L, sampled "
             "| ROUGE-L, greedy |", "|---|---:|---|---:|---|---:|---:|---:|"]
    for label, name in REGIMES.items():
        path = root / name / "summary.json"
        if not path.is_file():
            continue
        s = json.loads(path.read_text())
        geo, comps = s.get("geometry", {}), s.get("comparisons", {})
        init = next((g["initial"] for g in geo.values() if g.get("initial")), None)
        for a, b in PAIRS:
            c = comps.get(f"{b} − {a}")
            if not c:
                continue
            ends = [np.mean(geo.get(arm, {}).get("end") or [np.nan]) for arm in (a, b)]
            seeds = len(next(iter(c.values()))["seeds"])
            lines.append(
                f"| {label} | {'–' if init is None else f'{np.mean(init):.4f}'} | {a} / {b} | {seeds} | "
                f"{'–' if np.isnan(ends).any() else f'{ends[0]:.4f} → {ends[1]:.4f} ({ends[1] - ends[0]:+.4f})'} | "
                f"{_diff(c.get('nll'), '.4f')} | {_diff(c.get('rougeL (sampled)'), '.2f')} | "
                f"{_diff(c.get('rougeL'), '.2f')} |")
    return "\n".join(lines) + "\n"


def cost_table(root: Path = RESULTS) -> str:
    """Markdown: per regime, the hours its steps took (``units/<regime>/steps.jsonl``: every step ever finished,
    withdrawn units included, a resumed step only its last part; each process ran one thread, so hours ≈
    core-hours), split into training and evaluation; its dev tuning (``tune-<regime>/*/steps.jsonl`` where
    committed); and DistiLLM's sampling time (``loss_generation_s`` of the DistiLLM ± MTA units' training logs) as a
    share of their training time."""
    lines = ["| regime | study: training h | study: evaluation h | tuning h | DistiLLM sampling, share of its training |",
             "|---|---:|---:|---:|---:|"]
    for label, name in REGIMES.items():
        units = root / "units" / name
        if not (units / STEP_LOG).is_file():
            continue
        hist = step_history(units)
        train = sum(hist.pop("train", []))
        evaluate = sum(s for v in hist.values() for s in v)
        tuning = sum(sum(s for v in step_history(d).values() for s in v) for d in (root / f"tune-{name}").glob("*"))
        gen = total = 0.0
        for timing in (t for row in ("distillm", "distillm_mta") for t in units.glob(f"{row}/seed*/timing.json")):
            history = json.loads((timing.parent / "train" / "log_history.json").read_text())
            gen += sum(e.get("loss_generation_s", 0.0) for e in history)
            total += json.loads(timing.read_text())["train_s"]
        lines.append(f"| {label} | {train / 3600:.1f} | {evaluate / 3600:.1f} | "
                     f"{f'{tuning / 3600:.1f}' if tuning else '–'} | "
                     f"{f'{gen / 3600:.2f} h of {total / 3600:.2f} h ({gen / total:.0%})' if total else '–'} |")
    return "\n".join(lines) + "\n"
