"""Tune the quality study's learning rate and MTA weights on dev.jsonl only (issue 14), per budget:

    python benchmarks/tune.py --budget {pruned,random,pretrained} [--row skl|distillm|distillm2] [--out DIR]
                              [--threads N] [--assets DIR]

Stage 1: SKL at each learning rate of ``LR_GRID`` → the rate with the lowest dev response NLL (ties: KL); with
``--row distillm`` / ``distillm2`` that row's rate only (the kd_ratio-1 bases), in OUT/tune-<row>.json / .md, by the
paper's metric: the highest dev sampled ROUGE-L (DistiLLM's skew KL without a CE term trades teacher-forced NLL for
sharper samples: in regime (c) every rate raised dev NLL above the untrained student's, so NLL cannot choose).
Stage 2: SKL+MTA at that rate for each (λ_DSA, λ_Hid) of ``LAMBDA_GRID`` → the lowest dev NLL (points named
``skl_mta_dsa<λ_DSA>_hid<λ_Hid>_lr<rate>``; runs before the first extension of the grid lacked the ``_lr`` part).
Every point is one ``benchmarks/quality.py`` run (training seed 42, ``--sets dev --metrics nll kl``) in
``OUT/<point>/``: resumable, a rerun skips finished points. ``OUT/tune.json`` and ``OUT/tune.md`` hold every
point's dev NLL and KL and the choice; the evaluation sets are never looked at.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402

# The first grid chose points at its edges (pruned lr 3e-4, λ 8 / 0.8 in both regimes): each grid got one more
# point beyond them (pruned 1e-3, random 3e-4, λ 32 / 3.2) after the study had started with the first choice.
LR_GRID = {"pruned": [1.0e-4, 3.0e-4, 1.0e-3], "random": [3.0e-4, 1.0e-3, 3.0e-3],
           "pretrained": [3.0e-5, 1.0e-4, 3.0e-4, 1.0e-3]}  # regime (c); 3e-5 added when 1e-4 led the first three
# a row's extra rates where its optimum sat at the grid's edge: DistiLLM's dev sampled ROUGE-L fell with the rate
# (3e-5 8.62 > 1e-4 8.44 > 3e-4 8.21); DistiLLM-2's 1e-5 was started when 3e-5 led the first two finished points
# (7.49 > 7.42 at 1e-4); 3e-4 (7.81) then led, inside the grid
LR_EXTRA = {"pretrained": {"distillm": [1.0e-5], "distillm2": [1.0e-5]}}
LAMBDA_GRID = [(0.5, 0.2), (2.0, 0.2), (8.0, 0.8), (32.0, 3.2)]  # (λ_DSA, λ_Hid); the spec's default is (2, 0.2)
# regime (c): 0.5 / 0.2 led at the grid's low edge, so one point below it
LAMBDA_EXTRA = {"pretrained": [(0.1, 0.05)]}


def run_point(budget: str, out: Path, row: str, overrides: list[str], threads: int | None, assets: Path,
              sampled: bool = False) -> dict:
    """One point's dev NLL and KL (with ``sampled`` also its sampled ROUGE-L, ``rougeL_sampled``)."""
    metrics = ["nll", "kl"] + (["sampled"] if sampled else [])
    argv = ["--budget", budget, "--only", row, "--sets", "dev", "--metrics", *metrics, "--train-seeds", "42",
            "--out", str(out), "--assets", str(assets), *[a for o in overrides for a in ("--set", o)]]
    if threads:
        argv += ["--threads", str(threads)]
    if quality.main(argv) != 0:
        raise SystemExit(f"tune: quality.py {' '.join(argv)} failed")
    evaluated = out / row / "seed42" / "eval"
    m = json.loads((evaluated / "metrics.json").read_text())["sets"]["dev"]
    point = {"nll": m["nll"], "kl": m["kl"], "overrides": overrides}
    if sampled:
        point["rougeL_sampled"] = json.loads((evaluated / "sampled" / "metrics.json").read_text())["sets"]["dev"]["mean"]
    return point


def best(points: dict, sampled: bool = False) -> str:
    """The lowest dev NLL (ties: KL), or with ``sampled`` the highest dev sampled ROUGE-L (ties: NLL)."""
    if sampled:
        return min(points, key=lambda k: (-round(points[k]["rougeL_sampled"], 2), points[k]["nll"]))
    return min(points, key=lambda k: (round(points[k]["nll"], 4), points[k]["kl"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", required=True, choices=sorted(LR_GRID))
    p.add_argument("--out", type=Path, default=None, help="default: runs/tune-<budget>")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--assets", type=Path, default=quality.DEFAULT_ASSETS, help=f"default: {quality.DEFAULT_ASSETS}")
    p.add_argument("--row", default="skl", choices=["skl", "distillm", "distillm2"],
                   help="the row whose learning rate is tuned (default skl, then λ on SKL+MTA); distillm / distillm2: "
                        "the learning rate of the kd_ratio-1 bases only (points <row>_lr<rate>, OUT/tune-<row>.json)")
    args = p.parse_args(argv)
    out = (args.out or quality.REPO / "runs" / f"tune-{args.budget}").resolve()
    kd1 = args.row != "skl"  # a kd_ratio-1 base: its learning rate only, by dev sampled ROUGE-L
    lrs = {f"{args.row}_lr{lr:g}": run_point(args.budget, out / f"{args.row}_lr{lr:g}", args.row,
                                             [f"training.learning_rate={lr}"], args.threads, args.assets, sampled=kd1)
           for lr in sorted(LR_GRID[args.budget] + LR_EXTRA.get(args.budget, {}).get(args.row, []))}
    lr_key = best(lrs, sampled=kd1)
    lr = lrs[lr_key]["overrides"][0]
    criterion = ("highest dev sampled ROUGE-L (temperature 1, seeds 10-50; ties: NLL)" if kd1
                 else "lowest dev response NLL (ties: KL)") + ", training seed 42"
    if kd1:
        return _write(out, f"tune-{args.row}", {"budget": args.budget, "row": args.row, "criterion": criterion,
                                                "lr": lrs, "chosen": {"lr": lr}}, lrs, [lr_key])
    rate = lr_key.removeprefix("skl_")  # λ points are named by their learning rate too: each rate has its own
    lams = {f"skl_mta_dsa{a:g}_hid{b:g}_{rate}": run_point(
        args.budget, out / f"skl_mta_dsa{a:g}_hid{b:g}_{rate}", "skl_mta",
        [lr, f"objective.mta.lambda_dsa={a}", f"objective.mta.lambda_hid={b}"], args.threads, args.assets)
        for a, b in LAMBDA_GRID + LAMBDA_EXTRA.get(args.budget, [])}
    lam_key = best(lams)
    result = {"budget": args.budget, "criterion": criterion, "lr": lrs, "lambda": lams,
              "chosen": {"lr": lr, "mta": lams[lam_key]["overrides"][1:]}}
    return _write(out, "tune", result, {**lrs, **lams}, [lr_key, lam_key])


def _write(out: Path, name: str, result: dict, points: dict, chosen: list[str]) -> int:
    """OUT/<name>.json (``result``) and OUT/<name>.md (every point's dev NLL and KL, the chosen ones marked)."""
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    rouge = all("rougeL_sampled" in v for v in points.values())
    lines = [f"# Tuning on dev ({result['budget']}{', ' + result['row'] if 'row' in result else ''})", "",
             f"Criterion: {result['criterion']}.", "",
             "| point | dev NLL | dev KL |" + (" dev sampled ROUGE-L |" if rouge else ""),
             "|---|---:|---:|" + ("---:|" if rouge else "")]
    lines += [f"| {k}{' (chosen)' if k in chosen else ''} | {v['nll']:.4f} | {v['kl']:.4f} |"
              + (f" {v['rougeL_sampled']:.2f} |" if rouge else "") for k, v in points.items()]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0

if __name__ == "__main__":
    sys.exit(main())
