"""The dev-only study of issue 7: does MTA help SKL when MTA weighs more, the student is smaller, or training
is longer? Every setting reruns rows of ``benchmarks/quality.py --budget small`` with a few ``--set``
changes and evaluates on ``../shared/data/train/dev.jsonl`` only (16 prompts × 5 seeds, as the small
budget); the eval sets are never looked at here.

    python benchmarks/study.py --main DIR [--out DIR] [--only SETTING ...] [--report-only]

``--main`` is the output directory of the main small run (``quality.py --budget small``); its SKL and
SKL+MTA rows are the study's reference setting and the SKL row of the settings that only change MTA.
Each setting writes ``OUT/<setting>/`` (a quality.py output directory, resumable); ``OUT/study.md``
is the table: dev ROUGE-L of SKL and SKL+MTA, the paired bootstrap of the difference, and how much of
the SKL+MTA training loss MTA's terms are (λ_DSA·L_DSA + λ_Hid·L_Hid over the total, first / last 10 steps).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality


@dataclass(frozen=True)
class Setting:
    name: str
    description: str
    overrides: list[str] = field(default_factory=list)
    own_skl: bool = True  # False: the change only touches MTA, so SKL is the main run's row

    def argv(self, out: Path) -> list[str]:
        rows = ["skl", "skl_mta"] if self.own_skl else ["skl_mta"]
        return ["--budget", "small", "--sets", "dev", "--metrics", "rougeL", "--out", str(out / self.name), "--only", *rows,
                *[a for o in self.overrides for a in ("--set", o)]]


SETTINGS = [
    Setting("lambda_x5", "λ_DSA / λ_Hid = 10 / 1 (5 × the default)",
            ["objective.mta.lambda_dsa=10", "objective.mta.lambda_hid=1"], own_skl=False),
    Setting("student6", "6-block student (teacher blocks 1, 7, 13, 18, 24, 30); key layers S2→T10 word, "
                        "S4→T20, S6→T30 phrase",
            ["student.from_teacher.num_layers=6", "objective.mta.key_layers=null", "objective.mta.stride=2"]),
    Setting("steps120", "120 steps (2.2 epochs) instead of 60", ["training.max_steps=120"]),
    Setting("lambda_x20", "λ_DSA / λ_Hid = 40 / 4 (20 × the default)",
            ["objective.mta.lambda_dsa=40", "objective.mta.lambda_hid=4"], own_skl=False),
]
NAMES = [s.name for s in SETTINGS]


def mta_share(train_dir: Path, window: int = 10) -> tuple[float, float] | None:
    """Share of the logged training loss that is λ_DSA·L_DSA + λ_Hid·L_Hid, over the first / last steps."""
    from plot_losses import load_history

    entries, lam = load_history(train_dir)
    entries = [e for e in entries if "loss_dsa" in e]
    if not (entries and lam):
        return None

    def share(es):
        mta = sum(lam["lambda_dsa"] * e["loss_dsa"] + lam["lambda_hid"] * e.get("loss_hid", 0.0) for e in es)
        return mta / sum(e["loss"] for e in es)

    return share(entries[:window]), share(entries[-window:])


def _unit(run_dir: Path, row: str) -> Path:
    """The row's first training-seed directory (quality.py's DIR/<row>/seed<N>; DIR/<row> in runs made
    before training seeds were a dimension)."""
    seeds = sorted((run_dir / row).glob("seed*"))
    return seeds[0] if seeds else run_dir / row


def _row(run_dir: Path, row: str) -> dict | None:
    from mtakd.report import load_run

    metrics = _unit(run_dir, row) / "eval"
    return load_run(metrics) if (metrics / "metrics.json").is_file() else None


def study_table(main: Path, out: Path) -> str:
    from mtakd.report import compare

    header = ["| setting | SKL dev | SKL+MTA dev | SKL+MTA − SKL [95 % CI] | MTA share of loss (first → last 10 steps) |",
              "|---|---:|---:|---|---:|"]
    lines, notes = [], []
    for name, description, dirs in [("main", "the main small run: 10-block student, 60 steps, λ 2 / 0.2",
                                     (main, main))] + [
            (s.name, s.description, (out / s.name if s.own_skl else main, out / s.name)) for s in SETTINGS]:
        skl, mta = _row(dirs[0], "skl"), _row(dirs[1], "skl_mta")
        if mta is None:
            continue
        share = mta_share(_unit(dirs[1], "skl_mta") / "train")
        cells = [f"{mta['sets']['dev']['mean']:.2f} ± {mta['sets']['dev']['std']:.2f}"]
        if skl is not None:
            d = compare(skl, mta)["dev"]
            cells.insert(0, f"{skl['sets']['dev']['mean']:.2f} ± {skl['sets']['dev']['std']:.2f}")
            cells.append(f"{d['mean_diff']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]")
        else:
            cells = ["–", cells[0], "–"]
        cells.append(f"{100 * share[0]:.1f} % → {100 * share[1]:.1f} %" if share else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        notes.append(f"- `{name}`: {description}")
    if not lines:
        return "no finished setting\n"
    return "\n".join(header + lines + ["", *notes]) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="settings:\n" + "\n".join(f"  {s.name:11s} {s.description}" for s in SETTINGS))
    p.add_argument("--main", type=Path, required=True, help="output directory of quality.py --budget small")
    p.add_argument("--out", type=Path, default=quality.REPO / "runs" / "study")
    p.add_argument("--only", nargs="+", choices=NAMES, help="run only these settings (in the given order)")
    p.add_argument("--report-only", action="store_true", help="only write OUT/study.md from finished settings")
    args = p.parse_args(argv)
    if not args.report_only:
        for s in [s for n in args.only or NAMES for s in SETTINGS if s.name == n]:
            print(f"\n=== study setting {s.name}: {s.description}", flush=True)
            code = quality.main(s.argv(args.out))
            if code:
                return code
    args.out.mkdir(parents=True, exist_ok=True)
    table = study_table(args.main, args.out)
    (args.out / "study.md").write_text(table)
    print(f"\n{table}\nstudy table: {args.out / 'study.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
