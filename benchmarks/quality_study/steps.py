"""The study's resumable steps: what a unit's work is, which steps are done, running them in order with an ETA."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .plan import GEOMETRY_SET, METRICS, RELEVANT, SAMPLED_SETS, Row, budget_summary, unit_dir, workload


def _student_config(train_dir: Path) -> Path:
    """The trained student's config.json: written by every save, with the weights (sharded or not)."""
    return train_dir / "student" / "config.json"


def _trained(train_dir: Path) -> bool:
    return _student_config(train_dir).is_file() and (train_dir / "log_history.json").is_file()


@dataclass(frozen=True)
class Step:
    """One cached unit of work: training one (row, training seed), or one evaluation of it (teacher-forced
    metrics or ROUGE-L) on one set. ``marker`` exists exactly when the step is done."""

    kind: str  # "train" | "tf" (nll and kl) | "geo" (geometry: mtakd trajectory) | "rouge" | "sampled"
    row: Row
    seed: int | None  # training seed (None: an untrained row)
    cfg: object  # the RunConfig of this (row, seed)
    set_name: str | None = None
    metrics: tuple[str, ...] = ()

    @property
    def dir(self) -> Path:
        """The unit's directory (:func:`unit_dir`; its ``training.output_dir`` is ``<dir>/train``)."""
        return Path(self.cfg.training.output_dir).parent

    @property
    def marker(self) -> Path:
        if self.kind == "train":
            return _student_config(Path(self.cfg.training.output_dir))
        if self.kind == "geo":
            return self.dir / "geometry" / "trajectory.json"
        return self.dir / "eval" / f"{self.kind}-{self.set_name}" / "metrics.json"

    @property
    def label(self) -> str:
        who = self.row.id + (f" seed {self.seed}" if self.seed is not None and self.row.kind == "train" else "")
        what = "train" if self.kind == "train" else f"{'/'.join(self.metrics)} on {self.set_name}"
        what += " (sampled, seeds 10-50)" if self.kind == "sampled" else ""
        return f"{who}: {what}"

    def done(self) -> bool:
        """Finished, with every metric it asks for (a step once run with fewer metrics runs again), and — for an
        evaluation of a trained unit — after its student was last written (a retrained student is evaluated
        again, as ``make`` rebuilds what is older than its input)."""
        if self.kind == "train":
            return _trained(Path(self.cfg.training.output_dir))
        if not self.marker.is_file():
            return False
        student = _student_config(Path(self.cfg.training.output_dir))
        if self.row.kind == "train" and student.is_file() and self.marker.stat().st_mtime < student.stat().st_mtime:
            return False
        return self.kind == "geo" or set(self.metrics) <= set(_read_json(self.marker).get("metrics", []))


def build_steps(units, metrics=METRICS) -> list[Step]:
    """Every step of ``units`` ([(row, seed, cfg)]) in run order: per unit its training, then the teacher-forced
    metrics on each set (nll, and kl for every row but the teacher itself; cheap), with ``geometry`` the unit's
    trajectory on dev (initial student; trained: mid-way and final), then ROUGE-L (generation, the slow part) on
    each set, with ``sampled`` the paper's sampled ROUGE-L on :data:`SAMPLED_SETS` — all of a unit before the next: a unit needs its trained student, which only its session has."""
    steps = []
    for row, seed, cfg in units:
        if row.kind == "train":
            steps.append(Step("train", row, seed, cfg))
        tf = tuple(m for m in ("nll", "kl") if m in metrics and not (m == "kl" and row.kind == "teacher"))
        names = [Path(f).stem for f in cfg.eval.data]
        steps += [Step("tf", row, seed, cfg, name, tf) for name in names if tf]
        if "geometry" in metrics and row.kind != "teacher":
            steps.append(Step("geo", row, seed, cfg, GEOMETRY_SET, ("geometry",)))
        steps += [Step("rouge", row, seed, cfg, name, ("rougeL",)) for name in names if "rougeL" in metrics]
        steps += [Step("sampled", row, seed, cfg, name, ("rougeL",)) for name in names
                  if "sampled" in metrics and name in SAMPLED_SETS]
    return steps


STEP_LOG = "steps.jsonl"  # one line per finished step: kind, label, seconds (the ETA's history)


def step_history(out: Path) -> dict[str, list[float]]:
    """Seconds of every finished step by kind, from DIR/steps.jsonl (this and earlier invocations)."""
    hist: dict[str, list[float]] = {}
    path = out / STEP_LOG
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                e = json.loads(line)
                hist.setdefault(e["kind"], []).append(float(e["seconds"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return hist


def estimate_remaining(steps: list[Step], hist: dict[str, list[float]]) -> float | None:
    """Seconds the pending ``steps`` should take: each at the mean duration of finished steps of its kind
    (of any kind when none of its kind has finished yet); None without any history."""
    every = [s for v in hist.values() for s in v]
    if not every:
        return None
    mean = {k: sum(v) / len(v) for k, v in hist.items() if v}
    fallback = sum(every) / len(every)
    return sum(mean.get(s.kind, fallback) for s in steps)


def pending_steps(steps: list[Step]) -> list[Step]:
    """The steps still to run: every evaluation not done, and a unit's training when its student is missing and one
    of its evaluations is still to run (a unit whose evaluations are all done — e.g. committed results without
    the weights — is not retrained; a unit without evaluation steps is trained)."""
    todo = [s for s in steps if not s.done()]
    waiting = {s.dir for s in todo if s.kind != "train"}
    evaluated = {s.dir for s in steps if s.kind != "train"}
    return [s for s in todo if s.kind != "train" or s.dir in waiting or s.dir not in evaluated]


def run_steps(steps: list[Step], out: Path, runner, clock=time.perf_counter) -> dict[str, float]:
    """Run every pending step in order with ``runner(step)``; skip the done ones (:func:`pending_steps`), and those
    another run on the same ``out`` finished meanwhile (two workers can share a study: give the second one the
    last units with ``--only``/``--train-seeds``). A progress line per step gives its number, what it is and the
    estimated remaining time. Returns {step label: seconds}."""
    out.mkdir(parents=True, exist_ok=True)
    pending = pending_steps(steps)
    print(f"{len(steps)} steps, {len(steps) - len(pending)} done already, {len(pending)} to run", flush=True)
    hist = step_history(out)
    took = {}
    for k, step in enumerate(pending):
        number = f"[{len(steps) - len(pending) + k + 1}/{len(steps)}] {step.label}"
        if step.done():  # finished meanwhile by another run of the study on the same directory
            print(f"{number}: done by another run, skipped", flush=True)
            continue
        left = estimate_remaining(pending[k:], hist)
        eta = f"~{_fmt_s(left)} left (estimated)" if left is not None else "remaining time: unknown yet"
        print(f"{number} ... ({eta})", flush=True)
        start = clock()
        runner(step)
        took[step.label] = seconds = round(clock() - start, 1)
        hist.setdefault(step.kind, []).append(seconds)
        with (out / STEP_LOG).open("a") as fh:
            fh.write(json.dumps({"kind": step.kind, "step": step.label, "row": step.row.id, "seed": step.seed,
                                 "seconds": seconds}) + "\n")
        left = estimate_remaining(pending[k + 1:], hist)
        print(f"    done in {_fmt_s(seconds)}; {len(pending) - k - 1} steps left"
              + (f", ~{_fmt_s(left)}" if left else ""), flush=True)
    return took


def status(row: Row, out: Path, cfg=None, steps: list[Step] | None = None) -> str:
    """A row's state: its steps done / total (``steps``: the row's steps, all seeds), or a config conflict."""
    for d in sorted({unit_dir(out, row, s.seed) for s in steps or []}) or [out / row.id]:
        changed = _changed_sections(row, cfg, d) if cfg is not None else []
        if changed:
            return f"CONFLICT: {d} was run with another config (sections {changed})"
    if steps is None:
        return "pending"
    todo = pending_steps(steps)
    done = len(steps) - len(todo)
    if not todo:
        return "done"
    partial = [s for s in todo if s.kind == "train"
               and any(Path(s.cfg.training.output_dir).glob("checkpoint-*"))]
    note = ", a training resumes from its last checkpoint" if partial else ""
    return "pending" if done == 0 and not partial else f"{done}/{len(steps)} steps done{note}"


def print_plan(budget: str, out: Path, planned, as_json: bool = False, steps_by_row=None) -> None:
    steps_by_row = steps_by_row or {}
    dumped = [(row, cfg.model_dump(mode="json")) for row, cfg in planned]
    if as_json:
        print(json.dumps({
            "budget": budget, "summary": budget_summary(budget), "out": str(out),
            "rows": [{"id": r.id, "label": r.label, "kind": r.kind,
                      "status": status(r, out, cfg, steps_by_row.get(r.id)),
                      "steps": [s.label for s in steps_by_row.get(r.id, [])],
                      "workload": workload(cfg), "config": {k: d[k] for k in RELEVANT[r.kind]}}
                     for (r, d), (_, cfg) in zip(dumped, planned)],
        }, indent=1))
        return
    print(f"budget {budget}: {budget_summary(budget)}")
    print(f"output: {out}")
    train = [(r, d) for r, d in dumped if r.kind == "train"]
    if train:
        shared = {k: v for k, v in train[0][1]["training"].items() if k not in ("output_dir", "seed")}
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
        print(f"  {row.id:15s} {row.label:26s} [{status(row, out, cfg, steps_by_row.get(row.id))}] {steps}"
              f"{w['eval_batches']} generation batches per seed")
        print(f"      objective: {what}")


def _changed_sections(row: Row, cfg, d: Path) -> list[str]:
    """Config sections in which an earlier run of this unit (``d``/row.json) differs from ``cfg``."""
    path = d / "row.json"
    if not path.is_file():
        return []
    prev = json.loads(path.read_text()).get("config", {})
    mine = cfg.model_dump(mode="json")
    if row.kind == "train":  # the training seed is the unit's own (a row's cfg shows its first seed)
        prev = {**prev, "training": {k: v for k, v in prev.get("training", {}).items() if k not in ("seed", "output_dir")}}
        mine = {**mine, "training": {k: v for k, v in mine["training"].items() if k not in ("seed", "output_dir")}}
    return [k for k in RELEVANT[row.kind] if _differs(prev.get(k), mine[k])]


FREE_FORM = ("extra_args", "options", "config_overrides")  # config dicts of the user's keys: compared exactly


def _differs(old, new) -> bool:
    """Values differ, ignoring schema keys only one side has: a config field added to (or dropped from) mtakd
    since the unit ran keeps its default, so it does not make a finished unit stale."""
    if isinstance(old, dict) and isinstance(new, dict):
        return any(_differs(old[k], new[k]) for k in old.keys() & new.keys() - set(FREE_FORM)) \
            or any((old.get(k) or {}) != (new.get(k) or {}) for k in FREE_FORM)
    return old != new


def _check_row_file(row: Row, cfg, d: Path) -> None:
    """Write ``d``/row.json, or check that an earlier run of this unit had the same config."""
    path = d / "row.json"
    mine = cfg.model_dump(mode="json")
    if path.is_file():
        changed = _changed_sections(row, cfg, d)
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


def merge_unit_metrics(d: Path, sampled: bool = False) -> dict | None:
    """Merge the evaluation steps of one unit (``d``/eval/<kind>-<set>/metrics.json) into ``d``/eval/metrics.json
    (the format of ``mtakd evaluate``, read by ``mtakd report``) — with ``sampled`` the sampled ROUGE-L steps
    into ``d``/eval/sampled/metrics.json instead (same sets, another protocol); None when no step has finished."""
    from mtakd.evaluate import merge_metrics

    parts = [json.loads(p.read_text()) for p in sorted((d / "eval").glob("*-*/metrics.json"))
             if p.parent.name.startswith("sampled-") == sampled]
    if not parts:
        return None
    merged = merge_metrics(parts)
    target = d / "eval" / ("sampled" if sampled else "") / "metrics.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(merged, indent=1) + "\n")
    return merged


def _fmt_s(s) -> str:
    if s is None:
        return "–"
    s = float(s)
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{int(s // 60)} min {s % 60:02.0f} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"
