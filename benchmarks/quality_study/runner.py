"""What runs one step: training a unit, its geometry (``mtakd trajectory``) and its evaluations, models loaded once."""

from __future__ import annotations

import gc
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from .plan import EVAL_SETS, GEOMETRY_SAMPLES, GEOMETRY_SET, MTA, PAPER_SEEDS, SHARED_DATA, Row, mta_section
from .steps import Step, _check_row_file, merge_unit_metrics

log = logging.getLogger("quality")


def _train(row: Row, cfg, d: Path, keep_checkpoints: bool) -> dict:
    """Train (or resume) the unit's student; returns timing fields."""
    from transformers.trainer_utils import get_last_checkpoint

    from mtakd.distill import distill
    from mtakd.run import RUN_FILE

    train_dir = Path(cfg.training.output_dir)
    resume = None
    if (train_dir / RUN_FILE).is_file() and train_dir.is_dir() and get_last_checkpoint(str(train_dir)):
        resume = "latest"
        print(f"    resuming training from {get_last_checkpoint(str(train_dir))}", flush=True)
    start = time.perf_counter()
    distill(cfg, resume=resume, overwrite=resume is None)
    timing = {"train_s": round(time.perf_counter() - start, 1), "train_resumed": resume is not None}
    history = json.loads((train_dir / "log_history.json").read_text())
    summary = next((e for e in reversed(history) if "train_runtime" in e), {})
    timing["trainer_runtime_s"] = summary.get("train_runtime")
    timing["train_steps"] = summary.get("step")
    keep_mid(train_dir, d / "mid", (summary.get("step") or 0) // 2)
    if not keep_checkpoints:
        for ckpt in train_dir.glob("checkpoint-*"):
            shutil.rmtree(ckpt, ignore_errors=True)
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/plot_losses.py
        from plot_losses import plot_losses

        plot_losses(train_dir, d / "losses.png", title=f"{row.label}: training losses ({d.relative_to(d.parents[1])})")
    except Exception as e:  # a plot must not cost a finished training run
        log.warning("%s: loss plot failed: %s", row.id, e)
    return timing


def keep_mid(train_dir: Path, mid: Path, step: int) -> Path | None:
    """Copy the student of the checkpoint at ``step`` (half the run: the budgets save there) to ``mid`` as a model
    directory, its MTA projectors in ``mta_projectors.safetensors`` as a finished run has them; None if absent."""
    from mtakd.distill import _split_projectors
    from mtakd.mta import PROJECTORS

    ckpt = train_dir / f"checkpoint-{step}"
    if step < 1 or not (ckpt / "config.json").is_file():
        return None
    shutil.rmtree(mid, ignore_errors=True)
    mid.mkdir(parents=True)
    for f in ckpt.iterdir():
        if f.is_file() and (f.suffix in (".json", ".jinja", ".safetensors", ".txt", ".model")) and f.name != "trainer_state.json":
            shutil.copy2(f, mid / f.name)
    projectors = _split_projectors(mid, PROJECTORS)
    if projectors:
        from safetensors.torch import save_file

        save_file(projectors, str(mid / "mta_projectors.safetensors"))
    return mid


class StepRunner:
    """Runs steps with the models they need, loaded once: the teacher (also the KL's reference), the initial
    student, the tokenizer, and the trained student of the unit being evaluated."""

    def __init__(self, keep_checkpoints: bool = False, student: str = "selected", data_root: Path = SHARED_DATA):
        self.keep_checkpoints, self.student, self.data_root = keep_checkpoints, student, data_root
        self.models: dict = {}
        self.sets: dict = {}

    def _base(self, cfg):
        if "tok" not in self.models:
            from transformers import set_seed

            from mtakd.run import build_models
            from mtakd.metrics import TeacherReference

            set_seed(cfg.training.seed)  # a randomly initialised student: the initial row is the seed's init
            teacher, initial, tok = build_models(cfg)
            # scored against by every unit of the process: the teacher runs once per evaluation batch
            self.models.update(teacher=teacher, initial=initial, tok=tok, reference=TeacherReference(teacher))
        return self.models

    def _model(self, step: Step):
        m = self._base(step.cfg)
        if step.row.kind != "train":
            return m["teacher" if step.row.kind == "teacher" else "initial"]
        from mtakd.config import ModelSource
        from mtakd.models import load_model

        path = str(Path(step.cfg.training.output_dir) / "student")
        if m.get("student_path") != path:
            m.pop("student", None)
            gc.collect()
            m.update(student=load_model(ModelSource(path=path)), student_path=path)
        return m["student"]

    def __call__(self, step: Step) -> None:
        from mtakd.evaluate import evaluate_model, load_eval_sets

        _check_row_file(step.row, step.cfg, step.dir)
        if step.kind == "train":
            timing = _train(step.row, step.cfg, step.dir, self.keep_checkpoints)
            (step.dir / "timing.json").write_text(json.dumps(timing, indent=1) + "\n")
            gc.collect()
            return
        if step.kind == "geo":
            measure_geometry(step, self.student, self.data_root)
            gc.collect()
            return
        e = step.cfg.eval
        path = next(f for f in e.data if Path(f).stem == step.set_name)
        if (path, e.max_samples) not in self.sets:
            self.sets[(path, e.max_samples)] = load_eval_sets([path], e.max_samples)
        model = self._model(step)
        sampled = step.kind == "sampled"  # the paper's protocol: temperature 1, top-p 1, seeds 10-50
        evaluate_model(
            model, self.models["tok"], self.sets[(path, e.max_samples)], seeds=PAPER_SEEDS if sampled else e.seeds,
            max_new_tokens=e.max_new_tokens, max_prompt_length=e.max_prompt_length, batch_size=e.batch_size,
            score_batch_size=e.score_batch_size,
            greedy=e.greedy and not sampled, template=step.cfg.data.template, system_prompt=step.cfg.data.system_prompt,
            out_dir=step.marker.parent, model_name=step.row.label, metrics=step.metrics,
            teacher=self.models["reference"] if "kl" in step.metrics else None, progress=False,
            max_response_length=e.max_response_length,
        )
        merge_unit_metrics(step.dir, sampled)


def measure_geometry(step: Step, student: str, data_root: Path = SHARED_DATA) -> None:
    """``mtakd trajectory`` of a unit on every dev.jsonl record: the initial student, or a trained unit's mid-way
    (UNIT/mid, then deleted) and final students, with the key layers of its student (also for rows without
    MTA) — UNIT/geometry/trajectory.json and .png."""
    from transformers import set_seed

    from mtakd.config import build_config
    from mtakd.trajectory import trajectory

    cfg = step.cfg.model_dump(mode="json")
    cfg["objective"] = {"base": "skl", "mta": mta_section(MTA, student)}
    cfg["teacher"].pop("cache", None)
    cfg = build_config(cfg)
    data = str(data_root / EVAL_SETS[GEOMETRY_SET])
    d = step.dir
    students = [] if step.row.kind == "initial" else [
        *([f"mid={d / 'mid'}"] if (d / "mid" / "config.json").is_file() else []),
        f"end={Path(cfg.training.output_dir) / 'student'}"]
    set_seed(cfg.training.seed)
    trajectory(cfg, students, data=data, samples=GEOMETRY_SAMPLES, out=d / "geometry",
               initial=step.row.kind == "initial", progress=False)
    shutil.rmtree(d / "mid", ignore_errors=True)
