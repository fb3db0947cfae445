"""`mtakd demo`: the embedded default, end to end — distil SmolLM2-135M-Instruct into a 10-block
student with MTA on skew KL, then score teacher, initial student and trained student with ROUGE-L."""

from __future__ import annotations

import time
from pathlib import Path

from .config import ConfigError, add_config_command, load_config

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
DEMO_TIME = "2.4 min on 2 idle CPU cores"  # measured from a clean clone (README, "Set up"); the same figure is stated there


def run_demo(config: str | Path = DEMO_CONFIG, overrides: list[str] | None = None) -> str:
    from .distill import distill
    from .evaluate import evaluate_model, load_eval_sets
    from .report import build_report
    from .run import build_models

    if not Path(config).is_file():
        raise ConfigError(f"demo config {config} not found: run the demo from a clone of the mtakd repository")
    cfg = load_config(config, overrides)
    out = Path(cfg.training.output_dir)
    start = time.perf_counter()
    sets = load_eval_sets(cfg.eval.data, cfg.eval.max_samples)
    e = cfg.eval
    kw = dict(seeds=e.seeds, max_new_tokens=e.max_new_tokens, max_prompt_length=e.max_prompt_length,
              batch_size=e.batch_size, score_batch_size=e.score_batch_size, greedy=e.greedy,
              template=cfg.data.template, system_prompt=cfg.data.system_prompt)

    print("[1/3] distilling (MTA on skew KL) ...", flush=True)
    student_dir = distill(cfg, overwrite=True)
    _drop_checkpoints(out)
    print("[2/3] evaluating teacher, initial student and distilled student ...", flush=True)
    teacher, initial, tok = build_models(cfg)  # the student as selected from the teacher, before training
    runs = {"teacher": teacher, "student (initial)": initial, "student (MTA+SKL)": load_model_dir(student_dir)}
    dirs = []
    for name, model in runs.items():
        d = out / "eval" / name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "_")
        evaluate_model(model.eval(), tok, sets, out_dir=d, model_name=name, **kw)
        dirs.append(d)
    print("[3/3] report", flush=True)
    table = build_report(dirs, out / "report.md", names=list(runs))
    minutes = (time.perf_counter() - start) / 60
    print(f"\n{table}\n\ndone in {minutes:.1f} min — student: {student_dir}  report: {out / 'report.md'}")
    return table


def _drop_checkpoints(out: Path) -> None:
    """Delete the run's checkpoints once the student is exported: the demo needs only ``student/`` (a demo
    checkpoint is ~1 GB, most of it optimizer state). ``mtakd distill`` with the same config keeps them."""
    import shutil

    dirs = sorted(out.glob("checkpoint-*")) + sorted(out.glob("tmp-checkpoint-*"))
    if not dirs:
        return
    size = sum(f.stat().st_size for d in dirs for f in d.rglob("*") if f.is_file())
    for d in dirs:
        shutil.rmtree(d)
    print(f"      deleted {', '.join(d.name for d in dirs)} ({size / 1e6:.0f} MB: the demo keeps the exported student; "
          "`mtakd distill --config ...` keeps checkpoints for --resume)", flush=True)


def load_model_dir(path: Path):
    from .config import ModelSource
    from .models import load_model

    return load_model(ModelSource(path=str(path)))


def _cmd_demo(args) -> int:
    run_demo(args.config, args.overrides)
    return 0


def add_parser(sub) -> None:
    p = add_config_command(
        sub, "demo", help=f"distil the embedded SmolLM2 teacher on example data and score it ({DEMO_TIME})",
        description="Distil SmolLM2-135M-Instruct into a 10-block student with MTA on skew KL, then score the\n"
        f"teacher, the initial and the trained student with ROUGE-L on eval.data ({DEMO_TIME}, see README).\n"
        "Writes training.output_dir (runs/demo): the student, losses.png, eval/ and report.md; the run's\n"
        "checkpoint is deleted once the student is exported (`mtakd distill` keeps it for --resume).",
        config_help="the demo's run config (default: configs/demo.yaml), all six sections as for distill",
        config_default=str(DEMO_CONFIG),
    )
    p.set_defaults(func=_cmd_demo)
