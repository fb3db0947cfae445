"""`mtakd evaluate`: sample responses to instruction sets and score them with ROUGE-L, following the
evaluation protocol of MiniLLM (Gu et al., 2024), DistiLLM (Ko et al., 2024) and MTA.

Protocol (the defaults)
    * Sampling with temperature 1.0, top-p 1.0 and **no top-k**. transformers fills every generation
      field left at ``None`` from the model's ``generation_config`` and then from its global defaults,
      which include ``top_k=50``; we therefore pass ``top_k=0`` explicitly, which transformers 5.x
      treats as "no top-k warper" (``GenerationMixin._get_logits_processor``). Repetition penalty,
      typical-p, epsilon/eta cutoffs are set to their neutral values for the same reason.
    * Five runs with seeds 10, 20, 30, 40, 50; ``transformers.set_seed(seed)`` before each (set, seed)
      run, so a run is reproducible for a given batch size. ``--greedy`` decodes once (first seed).
    * Prompts are formatted exactly as in training (:func:`mtakd.data.format_prompt`, same special-token
      rule as :mod:`mtakd.data`), limited to 256 tokens by dropping tokens from the *start* (the end holds
      the response cue); such prompts are counted (``prompts_truncated``). At most 256 new tokens are
      generated, so prompt + response stays within 512 tokens; generation stops at EOS.
    * Prompts are sorted by length into left-padded batches; results are written in input order.

Scoring
    ROUGE-L F1 × 100 from the ``rouge-score`` package, ``RougeScorer(["rougeL"], use_stemmer=True)``,
    ``score(target=reference, prediction=generation)``. This is what the MiniLLM harness does
    (``minillm/rouge_metric.py`` in microsoft/LMOps, reused by DistiLLM's ``evaluate_main.py``): the
    generated continuation is decoded with ``skip_special_tokens=True``, cut at EOS and stripped of
    surrounding whitespace; no other text normalisation is applied before ROUGE (their SQuAD-style
    ``normalize_answer`` is used for exact match only). The rouge-score tokenizer itself lower-cases,
    replaces every character outside ``[a-z0-9]`` by a space (so punctuation and non-ASCII letters are
    dropped) and Porter-stems tokens longer than three characters. An empty generation scores 0 and is
    counted (``empty_generations``, summed over seeds).

Aggregation
    Per set: the mean over prompts for each seed, then the mean and the population standard deviation
    (``ddof=0``) of those per-seed means. Average: the mean over sets of the set means; its std is that
    of the per-seed averages over sets. ``per_prompt`` holds each prompt's score averaged over seeds (the
    input of ``mtakd report --compare``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, ModelSource
from .models import add_source_arguments, source_from_args
from .data import DataError, Record, format_prompt, load_records

log = logging.getLogger(__name__)

PAPER_SEEDS = (10, 20, 30, 40, 50)
RUN_CONFIG_FILE = "mtakd_run.json"  # written next to a trained model by `mtakd distill`

_scorer = None


# -------------------------------------------------------------------------------------- scoring
def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 × 100 of ``prediction`` against ``reference`` (rouge-score, Porter stemming)."""
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer

        logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score logs every scorer it builds
        _scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return 100.0 * _scorer.score(target=reference, prediction=prediction)["rougeL"].fmeasure


# ------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class EncodedPrompt:
    text: str  # the formatted prompt (before truncation)
    ids: list[int]  # its token ids, at most max_prompt_length (left-truncated)
    truncated: bool


def default_template(tokenizer) -> str:
    """``chat`` when the tokenizer has a chat template, else ``alpaca``."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"


def encode_prompts(
    records: list[Record], tokenizer, *, template: str, system_prompt: str | None, max_prompt_length: int
) -> list[EncodedPrompt]:
    out = []
    for rec in records:
        text = format_prompt(rec, tokenizer, template, system_prompt).text
        # same rule as mtakd.data: a chat template writes its own special tokens
        ids = tokenizer(text, add_special_tokens=template != "chat")["input_ids"]
        truncated = len(ids) > max_prompt_length
        out.append(EncodedPrompt(text, list(ids[-max_prompt_length:]), truncated))
    return out


def check_references(records: list[Record]) -> None:
    """Every evaluation record needs a non-empty reference; the error names file:line."""
    for rec in records:
        if not rec.output.strip():
            raise DataError(
                f"{rec.where}: missing or empty reference (field output/response/completion/answer); "
                "every evaluation prompt needs a reference answer"
            )


# ---------------------------------------------------------------------------------- generation
def eos_token_ids(model, tokenizer) -> list[int]:
    """EOS ids of the tokenizer and of the model's generation config (e.g. <|im_end|> and <|endoftext|>)."""
    ids = []
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and i not in ids:
                ids.append(int(i))
    if not ids:
        raise DataError("the tokenizer has no EOS token: generation could not stop")
    return ids


def generation_config(model, tokenizer, *, greedy: bool, max_new_tokens: int):
    """The protocol's GenerationConfig; every sampling knob is explicit so nothing is inherited from the
    model's generation_config or from transformers' global defaults (top_k=50)."""
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_ids(model, tokenizer)[0]
    common = dict(
        max_new_tokens=max_new_tokens, min_new_tokens=0, num_beams=1, eos_token_id=eos_token_ids(model, tokenizer),
        pad_token_id=pad, repetition_penalty=1.0, no_repeat_ngram_size=0,
    )
    if greedy:
        return GenerationConfig(do_sample=False, **common)
    sampling = dict(temperature=1.0, top_p=1.0, top_k=0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)
    if getattr(model.generation_config, "min_p", None) is not None:
        sampling["min_p"] = 0.0  # None would inherit the model's value; 0 keeps every token
    return GenerationConfig(do_sample=True, **common, **sampling)


def _left_pad(rows: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def generate(
    model, tokenizer, prompt_ids: list[list[int]], *, seed: int, gen_config, batch_size: int = 8, desc: str = "",
    progress: bool = True,
) -> list[str]:
    """Decoded, stripped responses in the order of ``prompt_ids`` (batched by length, left-padded)."""
    from tqdm.auto import tqdm
    from transformers import set_seed

    eos = set(gen_config.eos_token_id if isinstance(gen_config.eos_token_id, list) else [gen_config.eos_token_id])
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    device = next(model.parameters()).device
    out: list[str] = [""] * len(prompt_ids)
    set_seed(seed)
    with torch.inference_mode():
        for batch in tqdm(batches, desc=desc or f"seed {seed}", unit="batch", disable=not progress):
            inputs = _left_pad([prompt_ids[i] for i in batch], gen_config.pad_token_id, device)
            seqs = model.generate(**inputs, generation_config=gen_config)
            new = seqs[:, inputs["input_ids"].shape[1]:].tolist()
            for i, tokens in zip(batch, new):
                stop = next((k for k, t in enumerate(tokens) if t in eos), len(tokens))
                out[i] = tokenizer.decode(tokens[:stop], skip_special_tokens=True).strip()
    return out


# ---------------------------------------------------------------------------------- evaluation
def evaluate_model(
    model,
    tokenizer,
    sets: dict[str, list[Record]],
    *,
    seeds=PAPER_SEEDS,
    max_new_tokens: int = 256,
    max_prompt_length: int = 256,
    batch_size: int = 8,
    greedy: bool = False,
    template: str | None = None,
    system_prompt: str | None = None,
    out_dir: str | os.PathLike | None = None,
    model_name: str | None = None,
    progress: bool = True,
) -> dict:
    """Generate for every (set, seed), score with ROUGE-L and return the metrics dict (see module doc).

    ``template=None`` picks ``chat`` when the tokenizer has a chat template, else ``alpaca``. With
    ``out_dir`` the generations, ``metrics.json`` and ``metrics.md`` are written there. The model is put
    in eval mode for the duration and restored afterwards; the tokenizer is not modified.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ConfigError("evaluate: at least one seed is needed")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"evaluate: seeds must be distinct, got {seeds}")
    if greedy and len(seeds) > 1:
        log.info("greedy decoding is deterministic: one run (seed %d) instead of %d", seeds[0], len(seeds))
        seeds = seeds[:1]
    for name, value in (("max_new_tokens", max_new_tokens), ("max_prompt_length", max_prompt_length),
                        ("batch_size", batch_size)):
        if value < 1:
            raise ConfigError(f"evaluate: {name} must be positive, got {value}")
    if not sets:
        raise ConfigError("evaluate: no evaluation sets")
    for name, records in sets.items():
        if not records:
            raise DataError(f"evaluation set {name!r} has no records")
        check_references(records)
    template = template or default_template(tokenizer)

    start = time.perf_counter()
    gen_config = generation_config(model, tokenizer, greedy=greedy, max_new_tokens=max_new_tokens)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        (out / "generations").mkdir(parents=True, exist_ok=True)
        ours = {f"{name}_seed{seed}.jsonl" for name in sets for seed in seeds}
        stale = sorted(p.name for p in (out / "generations").glob("*.jsonl") if p.name not in ours)
        if stale:
            log.warning("%s/generations holds files from another run: %s", out, ", ".join(stale))

    set_metrics, per_prompt, per_seed_means = {}, {}, {}
    was_training = model.training
    model.eval()
    try:
        for name, records in sets.items():
            prompts = encode_prompts(
                records, tokenizer, template=template, system_prompt=system_prompt,
                max_prompt_length=max_prompt_length,
            )
            scores = np.zeros((len(seeds), len(records)))
            empty = 0
            for s, seed in enumerate(seeds):
                texts = generate(
                    model, tokenizer, [p.ids for p in prompts], seed=seed, gen_config=gen_config,
                    batch_size=batch_size, desc=f"{name} seed {seed}", progress=progress,
                )
                scores[s] = [rouge_l(t, r.output) if t else 0.0 for t, r in zip(texts, records)]
                empty += sum(1 for t in texts if not t)
                if out is not None:
                    _write_generations(out / "generations" / f"{name}_seed{seed}.jsonl", prompts, records, texts,
                                       scores[s])
            seed_means = scores.mean(axis=1)
            per_seed_means[name] = seed_means
            per_prompt[name] = scores.mean(axis=0).tolist()
            set_metrics[name] = {
                "mean": float(seed_means.mean()),
                "std": float(seed_means.std()),
                "per_seed": {str(seed): float(m) for seed, m in zip(seeds, seed_means)},
                "n": len(records),
                "empty_generations": empty,
                "prompts_truncated": sum(p.truncated for p in prompts),
            }
            log.info("%s: ROUGE-L %.2f ± %.2f over %d seeds (%d prompts)", name, seed_means.mean(),
                     seed_means.std(), len(seeds), len(records))
    finally:
        model.train(was_training)

    averages = np.mean([per_seed_means[name] for name in sets], axis=0)  # per seed, over sets
    metrics = {
        "model": model_name or getattr(model.config, "name_or_path", "") or type(model).__name__,
        "protocol": {
            "decoding": "greedy" if greedy else "sampling",
            "temperature": None if greedy else 1.0,
            "top_p": None if greedy else 1.0,
            "top_k": None if greedy else 0,
            "seeds": seeds,
            "max_new_tokens": max_new_tokens,
            "max_prompt_length": max_prompt_length,
            "prompt_truncation": "left (keeps the end of the prompt)",
            "batch_size": batch_size,
            "template": template,
            "system_prompt": system_prompt,
            "eos_token_ids": list(gen_config.eos_token_id),
            "metric": "ROUGE-L F1 x100 (rouge-score RougeScorer(['rougeL'], use_stemmer=True))",
            "std": "population std (ddof=0) over seeds",
        },
        "sets": set_metrics,
        "average": {"mean": float(averages.mean()), "std": float(averages.std())},
        "per_prompt": per_prompt,
        "time_s": round(time.perf_counter() - start, 2),
    }
    if out is not None:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (out / "metrics.md").write_text(metrics_markdown(metrics))
    return metrics


def _write_generations(path: Path, prompts, records, texts, scores) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for p, rec, text, score in zip(prompts, records, texts, scores):
            row = {"prompt": p.text, "reference": rec.output, "generation": text, "rougeL": float(score)}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def metrics_markdown(metrics: dict) -> str:
    """A short markdown table of a metrics dict (one row per set, plus the average)."""
    p = metrics["protocol"]
    decoding = (
        "greedy" if p["decoding"] == "greedy"
        else f"sampling (temperature {p['temperature']}, top-p {p['top_p']}, no top-k)"
    )
    lines = [
        f"# ROUGE-L: {metrics['model']}",
        "",
        f"{decoding}; seeds {', '.join(map(str, p['seeds']))}; prompt ≤ {p['max_prompt_length']} tokens; "
        f"≤ {p['max_new_tokens']} new tokens; template `{p['template']}`.",
        "",
        "| set | n | ROUGE-L | per seed | empty | truncated prompts |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for name, m in metrics["sets"].items():
        seeds = ", ".join(f"{s}: {v:.2f}" for s, v in m["per_seed"].items())
        lines.append(
            f"| {name} | {m['n']} | {m['mean']:.2f} ± {m['std']:.2f} | {seeds} | {m['empty_generations']} "
            f"| {m['prompts_truncated']} |"
        )
    a = metrics["average"]
    lines.append(f"| **average** | | **{a['mean']:.2f} ± {a['std']:.2f}** | | | |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ CLI
def load_eval_sets(paths: list[str], max_samples: int | None = None) -> dict[str, list[Record]]:
    """Named sets (file stem -> records); a missing/empty reference is an error naming file:line."""
    sets: dict[str, list[Record]] = {}
    for path in paths:
        name = Path(path).stem
        if name in sets:
            raise ConfigError(f"two evaluation sets are named {name!r} (set names are file stems): {path}")
        records = load_records(path, require_output=False)
        check_references(records)
        sets[name] = records[:max_samples] if max_samples else records
    return sets


def run_prompt_format(src: ModelSource) -> dict:
    """``data.template`` / ``data.system_prompt`` of the training run that produced the model, if any."""
    try:
        from .models import resolve_source

        path, _ = resolve_source(src)
    except Exception:  # a hub id or bad source: the model loader reports it
        return {}
    run_file = Path(path) / RUN_CONFIG_FILE if path else None
    if run_file is None or not run_file.is_file():
        return {}
    try:
        data = json.loads(run_file.read_text()).get("data") or {}
    except (json.JSONDecodeError, AttributeError) as e:
        raise ConfigError(f"{run_file}: not a JSON object with a `data` mapping: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{run_file}: `data` must be a mapping")
    found = {k: data[k] for k in ("template", "system_prompt") if k in data}
    log.info("prompt format from %s: %s", run_file, found)
    return found


def main_evaluate(args) -> int:
    from .models import load_model, load_tokenizer

    if args.max_samples is not None and args.max_samples < 1:
        raise ConfigError(f"evaluate: --max-samples must be positive, got {args.max_samples}")
    src = source_from_args(args, "evaluate")
    sets = load_eval_sets(args.data, args.max_samples)
    trained = run_prompt_format(src)
    template = args.template or trained.get("template")
    system_prompt = args.system_prompt if args.system_prompt is not None else trained.get("system_prompt")

    start = time.perf_counter()
    tokenizer = load_tokenizer(src)
    model = load_model(src)
    log.info("loaded %s in %.1f s", src.describe(), time.perf_counter() - start)
    name = src.describe()
    if src.package and not src.gguf_file:
        from .models import resolve_source

        gguf = resolve_source(src)[1]
        name += f"/{gguf}" if gguf else ""
    metrics = evaluate_model(
        model, tokenizer, sets, seeds=args.seeds, max_new_tokens=args.max_new_tokens,
        max_prompt_length=args.max_prompt_length, batch_size=args.batch_size, greedy=args.greedy,
        template=template, system_prompt=system_prompt, out_dir=args.out, model_name=name,
    )
    print(metrics_markdown(metrics))
    print(f"written to {args.out} ({metrics['time_s']:.0f} s of generation and scoring)")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="sample responses to JSONL instruction sets and score ROUGE-L (MiniLLM/DistiLLM protocol)",
        description="Sample responses (temperature 1, top-p 1, no top-k; 5 seeds by default) to each JSONL set "
        "and score them with ROUGE-L F1 x100. Writes generations/, metrics.json and metrics.md to --out.",
    )
    add_source_arguments(p)
    p.add_argument("--data", nargs="+", required=True, metavar="FILE.jsonl",
                   help="evaluation sets (each named by its file stem); every record needs a reference output")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--seeds", nargs="+", type=int, default=list(PAPER_SEEDS), help="default: 10 20 30 40 50")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-prompt-length", type=int, default=256,
                   help="longer prompts keep their last tokens (default 256)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-samples", type=int, default=None, help="first N records of each set")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (one run) instead of sampling")
    p.add_argument("--template", choices=("chat", "alpaca", "raw"), default=None,
                   help="default: the training run's (mtakd_run.json), else chat if the tokenizer has one, else alpaca")
    p.add_argument("--system-prompt", default=None, help="system message for the chat template")
    p.set_defaults(func=main_evaluate)
