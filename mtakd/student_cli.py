"""`mtakd student`: build the initial student from the teacher (:mod:`mtakd.student`), save it with its tokenizer
and ``student.json`` (sizes, kept blocks and channels, held-out response NLL of teacher, student and a random init)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, RunConfig, add_config_command, load_config
from .metrics import response_nll
from .models import plain_copy
from .student import Geometry, batches, build_student, calibration_examples, target_geometry

STUDENT_FILE = "student.json"


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_student(cfg: RunConfig, out: Path, progress: bool = True) -> dict:
    """``mtakd student``: build the initial student, save it with its tokenizer and ``student.json``."""
    from .models import load_model, load_tokenizer, save_student

    if cfg.student.from_teacher is None:
        raise ConfigError("mtakd student: the config's student section needs `from_teacher` (the student is built "
                          "from the teacher)")
    from .data import check_data_files
    from .models import load_config as load_model_config

    ft = cfg.student.from_teacher
    check_data_files(cfg)  # before the teacher loads
    teacher_config = load_model_config(cfg.teacher)
    if ft.width_targets() and teacher_config is not None:
        target_geometry(teacher_config, ft)  # bad targets stop before the teacher loads
    tok = load_tokenizer(cfg.teacher)
    teacher = load_model(cfg.teacher).eval()
    if ft.width_targets():
        target_geometry(teacher, ft)  # bad targets stop before the data is read
    examples = calibration_examples(cfg, tok)
    student, report = build_student(cfg, teacher, tok, progress=progress, examples=examples)
    student.eval()
    torch.manual_seed(cfg.training.seed)
    random_init = plain_copy(student, student.config).eval()
    held = batches(examples[1], tok.pad_token_id, cfg.student.from_teacher.calibration.batch_size)
    rows = {"teacher": teacher, "student": student, "random_init": random_init}
    report["models"] = {
        name: {"parameters": n_params(m), "layers": m.config.num_hidden_layers, **vars(Geometry.of(m.config)),
               "response_nll": round(response_nll(m, held), 4) if held else None}
        for name, m in rows.items()}
    report["held_out_samples"] = len(examples[1])
    save_student(student, tok, out)
    (Path(out) / STUDENT_FILE).write_text(json.dumps(report, indent=1))
    return report


def format_table(report: dict) -> str:
    lines = [f"{'':12s} {'params':>10s} {'layers':>6s} {'hidden':>6s} {'mlp':>6s} {'heads/kv':>8s} {'resp. NLL':>9s}"]
    for name, m in report["models"].items():
        nll = "-" if m["response_nll"] is None else f"{m['response_nll']:.3f}"
        lines.append(f"{name:12s} {m['parameters'] / 1e6:9.2f}M {m['layers']:6d} {m['hidden']:6d} {m['mlp']:6d} "
                     f"{m['heads']:>4d}/{m['kv']:<3d} {nll:>9s}")
    lines.append(f"layers kept: {report['layers']}; calibration: {report['calibration_samples']} samples in "
                 f"{report['calibration_seconds']:.1f} s; NLL in nats per response token on "
                 f"{report.get('held_out_samples', 0)} held-out records")
    models = report["models"]
    nll = {k: models.get(k, {}).get("response_nll") for k in ("student", "random_init")}
    if None not in nll.values() and nll["student"] > nll["random_init"]:
        lines.append(f"note: the student starts worse than a random init ({nll['student']:.3f} vs "
                     f"{nll['random_init']:.3f}), as a student pruned in depth and width usually does before "
                     "distillation: cut blocks and channels break the residual stream the kept weights expect; "
                     "distillation repairs it fast (docs/students.md)")
    return "\n".join(lines)


def _cmd_student(args) -> int:
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--out {out} is not empty; pass --overwrite to replace its files")
    report = make_student(cfg, out)
    print(format_table(report))
    print(f"student saved to {out}")
    return 0


def add_parser(sub) -> None:
    p = add_config_command(sub, "student", help="build the initial student from the teacher (select blocks, prune "
                           "width) and save it without training", config_help="run config whose student section has from_teacher")
    p.add_argument("--out", required=True, help="directory for the student (HF model dir + student.json)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.set_defaults(func=_cmd_student)
