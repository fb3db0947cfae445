"""`mtakd generate`: answer every prompt of a JSONL file (or hub dataset) with a model and write the
records back with the generated response — the pre-generation step of DistiLLM-2 (teacher and student
responses, generated once before training, as the official code does with vLLM).

    mtakd generate --model runs/paper/gpt2-xl-sft/student --data dolly.jsonl --out pairs.jsonl
    mtakd generate --model gpt2 --data pairs.jsonl --out pairs.jsonl --field student_output

Every input record keeps all its fields; the generation goes into ``--field`` (default ``output``: the
teacher response the DistiLLM-2 objective trains on; a previous ``output`` value is kept as
``reference``). Prompts are formatted as in training (:func:`mtakd.data.format_prompt`, template from the
model's own training run when it was trained by mtakd, else ``--template``/the tokenizer default),
left-truncated to ``--max-prompt-length`` tokens, sorted by length into left-padded batches, and sampled
with temperature 1, top-p 1, no top-k (``--greedy`` for greedy decoding) after ``set_seed(--seed)``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .config import ConfigError, add_source_arguments, source_from_args
from .decoding import GENERATION_BATCH

log = logging.getLogger(__name__)


def generate_file(
    model, tokenizer, source: str, out: str | Path, *, field: str = "output", template: str | None = None,
    system_prompt: str | None = None, max_prompt_length: int = 256, max_new_tokens: int = 256, seed: int = 42,
    batch_size: int = GENERATION_BATCH, greedy: bool = False, max_samples: int | None = None, progress: bool = True,
) -> int:
    """Generate a response for every record of ``source`` into ``field`` and write JSONL to ``out``."""
    from .data import DataError, _record, read_rows
    from .decoding import generate, generation_config
    from .evaluate import default_template, encode_prompts

    rows = read_rows(source)[:max_samples]
    if not rows:
        raise DataError(f"{source}: no records")
    records = [_record(obj, where, require_output=False) for obj, where in rows]
    template = template or default_template(tokenizer)
    prompts = encode_prompts(records, tokenizer, template=template, system_prompt=system_prompt,
                             max_prompt_length=max_prompt_length)
    gen_cfg = generation_config(model, tokenizer, greedy=greedy, max_new_tokens=max_new_tokens)
    texts = generate(model, tokenizer, [p.ids for p in prompts], seed=seed, gen_config=gen_cfg,
                     batch_size=batch_size, desc=f"generating {field}", progress=progress)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for (obj, _), text in zip(rows, texts):
            obj = dict(obj)
            if field == "output" and "output" in obj and "reference" not in obj:
                obj["reference"] = obj["output"]
            obj[field] = text
            fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
    tmp.replace(out)  # `--out` may be the `--data` file itself
    truncated = sum(p.truncated for p in prompts)
    log.info("%d responses written to %s (%d prompts truncated, template %s)", len(texts), out, truncated, template)
    return len(texts)


def main_generate(args) -> int:
    from .evaluate import run_prompt_format
    from .models import load_model, load_tokenizer

    for name in ("max_new_tokens", "max_prompt_length", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"generate: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    src = source_from_args(args, "generate")
    trained = run_prompt_format(src)
    start = time.perf_counter()
    tokenizer = load_tokenizer(src)
    model = load_model(src)
    log.info("loaded %s in %.1f s", src.describe(), time.perf_counter() - start)
    n = generate_file(
        model, tokenizer, args.data, args.out, field=args.field, template=args.template or trained.get("template"),
        system_prompt=args.system_prompt if args.system_prompt is not None else trained.get("system_prompt"),
        max_prompt_length=args.max_prompt_length, max_new_tokens=args.max_new_tokens, seed=args.seed,
        batch_size=args.batch_size, greedy=args.greedy, max_samples=args.max_samples,
    )
    print(f"{n} responses of {src.describe()} written to {args.out} (field {args.field!r})")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="answer the prompts of a JSONL file with a model (DistiLLM-2's teacher/student responses)",
        description="Generate one response per record and write the records back with it in --field "
        "(default output; use --field student_output for the student's responses of DistiLLM-2).",
    )
    add_source_arguments(p)
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help="records with instruction[/input] (or a hub dataset id)")
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="output JSONL (may be --data itself)")
    p.add_argument("--field", default="output", help="record field receiving the response (default output)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-prompt-length", type=int, default=256, help="longer prompts keep their last tokens")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batch-size", type=int, default=GENERATION_BATCH,
                   help=f"sequences decoded at once (continuous batching; default {GENERATION_BATCH})")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--template", choices=["chat", "alpaca", "raw"],
                   help="prompt template (default: the model's training run, else chat if the tokenizer has one)")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--max-samples", type=int, default=None)
    p.set_defaults(func=main_generate)
