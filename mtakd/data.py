"""Instruction data: JSONL loading with clear errors, prompt formatting, tokenisation with response-only
labels, semantic-unit spans mapped onto tokens, and the padding collator."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

FIELDS = {  # canonical field -> accepted names (Alpaca/MiniLLM, Dolly, prompt/completion)
    "instruction": ("instruction", "prompt", "question"),
    "input": ("input", "context"),
    "output": ("output", "response", "completion", "answer"),
}

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


class DataError(ValueError):
    """Unusable input data; the message names the file and line."""


@dataclass(frozen=True)
class Record:
    instruction: str
    input: str
    output: str
    where: str  # "file:line" for messages
    student_output: str | None = None  # a student-generated response (DistiLLM-2 pairs; `mtakd generate --field`)


@dataclass
class DataStats:
    records: int = 0
    skipped_empty_output: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0

    def summary(self) -> str:
        return (
            f"{self.records} examples; skipped {self.skipped_empty_output} with empty output; "
            f"truncated {self.prompt_truncated} prompts and {self.response_truncated} responses"
        )


def _field(obj: dict, name: str):
    for key in FIELDS[name]:
        if key in obj and obj[key] is not None:
            return obj[key]
    return None


def _record(obj, where: str, require_output: bool) -> Record | None:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    values = {name: _field(obj, name) for name in FIELDS}
    missing = [f"{n} (or {'/'.join(FIELDS[n][1:])})" for n in ("instruction", "output") if values[n] is None]
    if not require_output:
        missing = missing[:1] if values["instruction"] is None else []
    if missing:
        raise DataError(f"{where}: missing required field(s): {', '.join(missing)}")
    for n, v in values.items():
        if v is not None and not isinstance(v, str):
            raise DataError(f"{where}: field {n!r} must be a string, got {type(v).__name__}")
    if require_output and not values["output"].strip():
        return None
    student = obj.get("student_output")
    if student is not None and not isinstance(student, str):
        raise DataError(f"{where}: field 'student_output' must be a string, got {type(student).__name__}")
    return Record(values["instruction"], values["input"] or "", values["output"] or "", where, student)


def read_rows(source: str) -> list[tuple[dict, str]]:
    """(raw JSON object, "file:line") of every record of a JSONL file, or of an HF dataset id when no such
    file exists (and the hub is reachable). A malformed line stops with ``file:line`` and the parser's reason."""
    path = Path(source)
    rows: list[tuple[dict, str]] = []
    if path.is_file():
        with path.open(encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((json.loads(line), f"{path}:{i}"))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: malformed JSON: {e.msg} (column {e.colno})") from None
    elif "/" in source and not source.startswith((".", "/")) and not path.suffix:
        try:
            import datasets

            ds = datasets.load_dataset(source, split="train")
        except ImportError as e:
            raise DataError(f"{source}: not a file; loading hub datasets needs `pip install datasets`") from e
        except Exception as e:
            raise DataError(f"{source}: not a local file and the hub dataset could not be loaded: {e}") from e
        rows = [(dict(obj), f"{source}[{i}]") for i, obj in enumerate(ds)]
    else:
        raise DataError(f"data file not found: {source}")
    return rows


def load_records(source: str, *, require_output: bool = True, stats: DataStats | None = None) -> list[Record]:
    """Records of a JSONL file or HF dataset id; records with an empty output are skipped and counted."""
    stats = stats if stats is not None else DataStats()
    records: list[Record] = []
    for obj, where in read_rows(source):
        rec = _record(obj, where, require_output)
        if rec is None:
            stats.skipped_empty_output += 1
        else:
            records.append(rec)
    if not records:
        raise DataError(f"{source}: no usable records (empty file, or every output is empty)")
    return records


# ------------------------------------------------------------------------------------ prompts
@dataclass(frozen=True)
class Prompt:
    text: str
    segments: tuple[tuple[int, str], ...]  # (char offset in text, content string): text the model reads


def format_prompt(rec: Record, tokenizer, template: str = "chat", system_prompt: str | None = None) -> Prompt:
    """The prompt string the model sees, and where the user's content lies inside it.

    ``chat``: the tokenizer's chat template (user turn = instruction, blank line, input); ``alpaca``:
    the MiniLLM/DistiLLM template; ``raw``: instruction and input on their own lines. Template markup is
    not content: only ``segments`` yield semantic units.
    """
    if template == "chat":
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError("data.template is 'chat' but the tokenizer has no chat template; use 'alpaca' or 'raw'")
        user = rec.instruction + (f"\n\n{rec.input}" if rec.input else "")
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": user}
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        start = text.rfind(user)
        if start < 0:  # a template that rewrites the content: keep the text, no prompt units
            return Prompt(text, ())
        segs = [(start, rec.instruction)] + ([(start + len(rec.instruction) + 2, rec.input)] if rec.input else [])
        return Prompt(text, tuple(segs))
    if template == "alpaca":
        text = (ALPACA_INPUT if rec.input else ALPACA).format(instruction=rec.instruction, input=rec.input)
    elif template == "raw":
        text = rec.instruction + (f"\n{rec.input}" if rec.input else "") + "\n"
    else:
        raise DataError(f"unknown template {template!r}; allowed: chat, alpaca, raw")
    i = text.index(rec.instruction)
    segs = [(i, rec.instruction)]
    if rec.input:
        segs.append((text.index(rec.input, i + len(rec.instruction)), rec.input))
    return Prompt(text, tuple(segs))


# ------------------------------------------------------------------------------- tokenisation
@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    spans: dict[str, np.ndarray] = field(default_factory=dict)  # granularity -> [K, 2] token ranges


def _encode(tokenizer, text: str, template: str):
    enc = tokenizer(text, add_special_tokens=template != "chat", return_offsets_mapping=True)
    return enc["input_ids"], np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)


def tokenize(
    rec: Record,
    tokenizer,
    *,
    template: str,
    system_prompt: str | None,
    max_prompt_length: int,
    max_length: int,
    stats: DataStats,
    units: dict[str, list] | None = None,
) -> Example:
    """Token ids of prompt+response+EOS, labels masked to −100 on the prompt, and (given ``units``, a
    granularity -> [(segment char offset, [(a, b) char spans]), ...] map) the units' token ranges."""
    from .spans import char_to_token_spans

    prompt = format_prompt(rec, tokenizer, template, system_prompt)
    ids, offsets = _encode(tokenizer, prompt.text + rec.output, template)
    real = offsets[:, 1] > offsets[:, 0]
    # first token starting at/after the response start (special tokens before it count as prompt)
    starts_resp = np.nonzero(real & (offsets[:, 0] >= len(prompt.text)))[0]
    n_prompt = int(starts_resp[0]) if len(starts_resp) else len(ids)
    ids = list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        offsets = np.vstack([offsets, [[0, 0]]])
    drop = max(0, n_prompt - max_prompt_length)  # long prompts keep their end (the response cue)
    if drop:
        stats.prompt_truncated += 1
    end = min(len(ids), drop + max_length)
    if end < len(ids):
        stats.response_truncated += 1
    input_ids = ids[drop:end]
    labels = [-100] * (n_prompt - drop) + ids[n_prompt:end]
    spans = {}
    for gran, segs in (units or {}).items():
        chars = [np.asarray(sp, dtype=np.int64).reshape(-1, 2) + off for off, sp in segs]
        chars = np.concatenate(chars) if chars else np.zeros((0, 2), np.int64)
        tok = char_to_token_spans(chars, offsets) - drop
        tok = np.clip(tok, 0, end - drop)
        spans[gran] = tok[tok[:, 1] > tok[:, 0]]
    return Example(input_ids, labels, spans)


def build_examples(
    records: list[Record], tokenizer, data_cfg, *, span_scope: str | None = None, stats: DataStats | None = None,
    progress: bool = True,
) -> list[Example]:
    """Tokenise records; with ``span_scope`` ("all"|"response") also attach word and phrase spans,
    parsed once with spaCy and cached on disk."""
    stats = stats if stats is not None else DataStats()
    unit_maps: list[dict | None] = [None] * len(records)
    if span_scope is not None:
        unit_maps = _unit_maps(records, tokenizer, data_cfg, span_scope, progress)
    out = [
        tokenize(
            r, tokenizer, template=data_cfg.template, system_prompt=data_cfg.system_prompt,
            max_prompt_length=data_cfg.max_prompt_length, max_length=data_cfg.max_length, stats=stats, units=u,
        )
        for r, u in zip(records, unit_maps)
    ]
    stats.records += len(out)
    return out


def _unit_maps(records, tokenizer, data_cfg, span_scope: str, progress: bool) -> list[dict]:
    from .spans import SpanParser

    parser = SpanParser(data_cfg.spacy_model, cache_dir=data_cfg.span_cache_dir)
    texts = sorted({t for r in records for t in (r.instruction, r.input, r.output) if t})
    parsed = dict(zip(texts, parser.parse(texts, progress=progress)))
    log.info("spans: %s", parser.stats)
    maps = []
    for r in records:
        prompt = format_prompt(r, tokenizer, data_cfg.template, data_cfg.system_prompt)
        segs = [(len(prompt.text), r.output)]
        if span_scope == "all":
            segs = list(prompt.segments) + segs
        maps.append(
            {
                "word": [(off, parsed[t].words) for off, t in segs if t],
                "phrase": [(off, parsed[t].phrases) for off, t in segs if t],
            }
        )
    return maps


# ---------------------------------------------------------------------------------- collation
class Collator:
    """Right-pads a batch; spans become dense 0/1 membership ``[B, K, T]`` (``word_spans``, ``phrase_spans``)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = 8):
        self.pad = pad_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        t = max(len(e.input_ids) for e in examples)
        if self.multiple:
            t = -(-t // self.multiple) * self.multiple
        b = len(examples)
        ids = torch.full((b, t), self.pad, dtype=torch.long)
        labels = torch.full((b, t), -100, dtype=torch.long)
        mask = torch.zeros((b, t), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e.input_ids)
            ids[i, :n] = torch.tensor(e.input_ids)
            labels[i, :n] = torch.tensor(e.labels)
            mask[i, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        pos = torch.arange(t)
        for gran in examples[0].spans:
            k = max(1, max(len(e.spans[gran]) for e in examples))
            ranges = torch.zeros((b, k, 2), dtype=torch.long)
            for i, e in enumerate(examples):
                ranges[i, : len(e.spans[gran])] = torch.from_numpy(e.spans[gran])
            batch[f"{gran}_spans"] = (pos >= ranges[..., :1]) & (pos < ranges[..., 1:])
        return batch


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]
