"""Instruction data: JSONL loading with clear errors, prompt formatting, tokenisation with response-only
labels, semantic-unit spans mapped onto tokens, the padding collator, and the check that a run's data files
parse (:func:`check_data_files`)."""

from __future__ import annotations

import json
import logging
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .errors import DataError  # noqa: F401  (raised here, defined in the leaf mtakd.errors)

# `RunConfig` in annotations is mtakd.config's; not imported, not even for type checking: the
# config validates against this module, which must not depend on it (tests/test_imports.py)

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
RAW = "{instruction}\n"
RAW_INPUT = "{instruction}\n{input}\n"
TEMPLATES = {"alpaca": (ALPACA, ALPACA_INPUT), "raw": (RAW, RAW_INPUT)}  # (without input, with input)
_PROBE = "\ue000mtakd-user-content\ue001"  # stands in for the user's text to find where a chat template puts it


@dataclass(frozen=True)
class Record:
    instruction: str
    input: str
    output: str
    where: str  # "file:line" for messages
    student_output: str | None = None  # a student-generated response (DistiLLM-2 pairs; `mtakd generate --field`)
    # every reference when the record's output is a list (e.g. S-NI); ``output`` is then the first one
    references: tuple[str, ...] = ()

    @property
    def all_references(self) -> tuple[str, ...]:
        """The references to score a generation against (ROUGE-L takes the best): ``references``, else
        ``(output,)``."""
        return self.references or (self.output,)


@dataclass
class DataStats:
    """Counts of one data split; written to ``mtakd_run.json`` as ``data_stats``."""

    records: int = 0
    skipped_empty_output: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    # with spans only: examples whose chat template rewrote the user's text (no instruction/input units) ...
    content_not_found: int = 0
    # ... and units that truncation cut (dropped, or kept as fragments with mta.truncated_units: keep)
    units_truncated: int = 0
    # objective.cross_tokenizer: units dropped because the other tokenisation has no token inside them (or cut them)
    units_cross_dropped: int = 0

    def summary(self) -> str:
        text = (
            f"{self.records} examples; skipped {self.skipped_empty_output} with empty output; "
            f"truncated {self.prompt_truncated} prompts and {self.response_truncated} responses"
        )
        if self.units_truncated:
            text += f"; {self.units_truncated} semantic units cut by truncation"
        if self.units_cross_dropped:
            text += (f"; {self.units_cross_dropped} semantic units dropped: represented in only one of the two "
                     "tokenisations")
        if self.content_not_found:
            text += f"; {self.content_not_found} prompts whose user text the chat template rewrote (no prompt units)"
        return text


@dataclass(frozen=True)
class SpanSettings:
    """Which semantic units (MTA_SPEC §3) the examples get; the ``span_scope``, ``truncated_units``,
    ``units_on_markup`` and ``symbol_words`` switches of ``objective.mta`` (docs/method.md)."""

    scope: str = "all"  # all | response
    truncated_units: str = "drop"  # drop | keep
    units_on_markup: bool = False
    symbol_words: str = "drop"  # drop | keep

    def __post_init__(self):
        for key, allowed in (("scope", ("all", "response")), ("truncated_units", ("drop", "keep")),
                             ("symbol_words", ("drop", "keep"))):
            if getattr(self, key) not in allowed:
                raise DataError(f"span setting {key}={getattr(self, key)!r}; allowed: {', '.join(allowed)}")

    @classmethod
    def from_mta(cls, mta) -> "SpanSettings":
        return cls(mta.span_scope, mta.truncated_units, mta.units_on_markup, mta.symbol_words)


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
    references: tuple[str, ...] = ()
    if isinstance(values["output"], list):  # several references (S-NI): scored against the best, trained on the first
        refs = values["output"]
        if not refs or not all(isinstance(r, str) for r in refs):
            raise DataError(f"{where}: field 'output' as a list must hold one or more strings, got {refs!r:.80}")
        references, values["output"] = tuple(refs), refs[0]
    for n, v in values.items():
        if v is not None and not isinstance(v, str):
            raise DataError(f"{where}: field {n!r} must be a string"
                            + (" or a list of strings" if n == "output" else "") + f", got {type(v).__name__}")
    if require_output and not values["output"].strip():
        return None
    student = obj.get("student_output")
    if student is not None and not isinstance(student, str):
        raise DataError(f"{where}: field 'student_output' must be a string, got {type(student).__name__}")
    return Record(values["instruction"], values["input"] or "", values["output"] or "", where, student, references)


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
    """A rendered prompt and its pieces ``(char offset, string, kind)``, kind ``instruction`` | ``input`` (the
    user's content) | ``markup`` (template text around it). ``content_found`` is False when a chat template
    rewrote the content: then the only piece is the whole text as ``markup``."""

    text: str
    segments: tuple[tuple[int, str, str], ...]
    content_found: bool = True


def _render(template: str, fields: dict[str, str]) -> list[tuple[int, str, str]]:
    """The pieces of a ``str.format`` template filled with ``fields``; offsets come from the template's own
    literal text, so content that also occurs in the header ("Instruction", "request") is never confused."""
    pieces, pos = [], 0
    for literal, name, _, _ in string.Formatter().parse(template):
        if literal:
            pieces.append((pos, literal, "markup"))
            pos += len(literal)
        if name is not None:
            pieces.append((pos, fields[name], name))
            pos += len(fields[name])
    return pieces


def format_prompt(rec: Record, tokenizer, template: str = "chat", system_prompt: str | None = None) -> Prompt:
    """The prompt string the model sees, and where the user's content lies inside it.

    ``chat``: the tokenizer's chat template (user turn = instruction, blank line, input); ``alpaca``:
    the MiniLLM/DistiLLM template; ``raw``: instruction and input on their own lines. The content's offsets
    come from the template (alpaca/raw: its literal text; chat: a render with a placeholder for the user
    turn), never from searching the rendered text.
    """
    if template == "chat":
        return _chat_prompt(rec, tokenizer, system_prompt)
    if template not in TEMPLATES:
        raise DataError(f"unknown template {template!r}; allowed: chat, alpaca, raw")
    pieces = _render(TEMPLATES[template][bool(rec.input)], {"instruction": rec.instruction, "input": rec.input})
    return Prompt("".join(p for _, p, _ in pieces), tuple(pieces))


def _chat_prompt(rec: Record, tokenizer, system_prompt: str | None) -> Prompt:
    """Chat template: rendered once with the user's text and once with a placeholder; the placeholder's
    surroundings are the markup, and the user's text must sit between them (else ``content_found`` False)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("data.template is 'chat' but the tokenizer has no chat template; use 'alpaca' or 'raw'")

    def render(user: str) -> str:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": user}
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    user = rec.instruction + (f"\n\n{rec.input}" if rec.input else "")
    text, probe = render(user), render(_PROBE)
    at = probe.find(_PROBE)
    head, tail = probe[:at], probe[at + len(_PROBE) :]
    fits = at >= 0 and len(text) >= len(head) + len(tail) and text.startswith(head) and text.endswith(tail)
    content = text[len(head) : len(text) - len(tail)] if fits else ""
    # the template may add around the user's text or trim it: look for the pieces inside the user turn only
    i = content.find(rec.instruction) if fits else -1
    j = content.find(rec.input, i + len(rec.instruction)) if rec.input and i >= 0 else i
    if i < 0 or j < 0:  # the template rewrites the content (e.g. changes its case)
        return Prompt(text, ((0, text, "markup"),), content_found=False)
    found = [(len(head) + i, rec.instruction, "instruction")]
    if rec.input:
        found.append((len(head) + j, rec.input, "input"))
    pieces, pos = [], 0
    for off, piece, kind in found + [(len(text), "", "")]:  # the text between the content is markup
        if off > pos:
            pieces.append((pos, text[pos:off], "markup"))
        if kind:
            pieces.append((off, piece, kind))
        pos = off + len(piece)
    return Prompt(text, tuple(pieces))


# ------------------------------------------------------------------------------- tokenisation
@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    spans: dict[str, np.ndarray] = field(default_factory=dict)  # granularity -> [K, 2] token ranges


@dataclass(frozen=True)
class Units:
    """The semantic units of one training text (prompt + response) as character spans of that text."""

    chars: np.ndarray  # [K, 2] int64 [start, end)
    kinds: np.ndarray  # [K] "word" | "np" | "vp"
    segments: np.ndarray  # [K] "instruction" | "input" | "response" | "markup"


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
    units: Units | None = None,
    truncated_units: str = "drop",
) -> Example:
    """Token ids of prompt+response+EOS, labels masked to −100 on the prompt, and (given ``units``) the
    units' token ranges per granularity (``word``; ``phrase`` = noun and verb phrases)."""
    return _tokenize(rec, tokenizer, template, system_prompt, max_prompt_length, max_length, stats, units,
                     truncated_units)[0]


def _tokenize(rec, tokenizer, template, system_prompt, max_prompt_length, max_length, stats, units, truncated_units,
              prompt: Prompt | None = None):
    """(example, rendered text, [K, 2] token ranges of ``units`` in the example, [K] kept); see :func:`tokenize`.

    Truncation keeps the prompt's end and cuts the response at ``max_length``; a unit that loses tokens to
    it is dropped (``truncated_units="drop"``) or kept with its remaining tokens (``"keep"``). ``prompt``: a prompt
    already rendered (by the student's tokenizer, in a cross-tokenizer run), else rendered here."""
    from .spans import char_to_token_ranges

    prompt = prompt if prompt is not None else format_prompt(rec, tokenizer, template, system_prompt)
    text = prompt.text + rec.output
    ids, offsets = _encode(tokenizer, text, template)
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
    if units is None:
        return Example(input_ids, labels), text, np.zeros((0, 2), np.int64), np.zeros(0, bool)
    tok, has = char_to_token_ranges(units.chars, offsets)
    tok = tok - drop
    n = end - drop
    survives = has & (tok[:, 0] < n) & (tok[:, 1] > 0)  # keeps at least one token
    cut = survives & ((tok[:, 0] < 0) | (tok[:, 1] > n))
    stats.units_truncated += int(cut.sum())
    kept = survives & ~cut if truncated_units == "drop" else survives
    tok = np.clip(tok, 0, n)
    word = units.kinds == "word"
    return Example(input_ids, labels, {"word": tok[kept & word], "phrase": tok[kept & ~word]}), text, tok, kept


def build_examples(
    records: list[Record], tokenizer, data_cfg, *, spans: SpanSettings | str | None = None,
    stats: DataStats | None = None, progress: bool = True,
) -> list[Example]:
    """Tokenise records; with ``spans`` (:class:`SpanSettings`, or just its scope "all" | "response") also
    attach word and phrase spans, parsed once with spaCy and cached on disk."""
    stats = stats if stats is not None else DataStats()
    settings = SpanSettings(scope=spans) if isinstance(spans, str) else spans
    prompts, units = [None] * len(records), [None] * len(records)
    if settings is not None:
        prompts, units = _record_units(records, tokenizer, data_cfg, settings, stats, progress)
    out = [
        _tokenize(r, tokenizer, data_cfg.template, data_cfg.system_prompt, data_cfg.max_prompt_length,
                  data_cfg.max_length, stats, u, settings.truncated_units if settings else "drop", prompt=p)[0]
        for r, p, u in zip(records, prompts, units)
    ]
    stats.records += len(out)
    return out


def describe_examples(records: list[Record], tokenizer, data_cfg, spans: SpanSettings, progress: bool = False):
    """For each record, ``{"text": rendered training text, "units": [...]}`` (``mtakd spans --show``): each
    unit that reaches training, with its kind (word | np | vp), segment, character range in ``text`` and the
    token range ``[token_start, token_end)`` of the example's ``input_ids`` (after truncation) that it pools."""
    stats = DataStats()
    for r, p, u in zip(records, *_record_units(records, tokenizer, data_cfg, spans, stats, progress)):
        _, text, tok, kept = _tokenize(r, tokenizer, data_cfg.template, data_cfg.system_prompt,
                                       data_cfg.max_prompt_length, data_cfg.max_length, stats, u,
                                       spans.truncated_units, prompt=p)
        yield {"text": text, "units": [
            {"kind": str(u.kinds[k]), "segment": str(u.segments[k]), "char_start": int(u.chars[k, 0]),
             "char_end": int(u.chars[k, 1]), "token_start": int(tok[k, 0]), "token_end": int(tok[k, 1]),
             "text": text[u.chars[k, 0] : u.chars[k, 1]]}
            for k in np.flatnonzero(kept)
        ]}


def _record_units(records, tokenizer, data_cfg, settings: SpanSettings, stats: DataStats, progress: bool):
    """(each record's :class:`Prompt`, the :class:`Units` of its training text): its segments' texts parsed once
    (cached); the prompts are reused when the records are tokenised (a chat template is rendered once)."""
    from .spans import SpanParser

    prompts = [format_prompt(r, tokenizer, data_cfg.template, data_cfg.system_prompt) for r in records]
    lost = [r.where for r, p in zip(records, prompts) if not p.content_found] if settings.scope == "all" else []
    if lost:
        stats.content_not_found += len(lost)
        log.warning(
            "%d of %d examples (first: %s): the chat template rewrites the user's text, so its instruction/input "
            "cannot be located and yield no semantic units%s", len(lost), len(records), lost[0],
            " (the whole prompt is parsed as markup)" if settings.units_on_markup else "",
        )
    segs = []
    for r, p in zip(records, prompts):
        prompt_segs = [sg for sg in p.segments if settings.units_on_markup or sg[2] != "markup"]
        segs.append((prompt_segs if settings.scope == "all" else []) + [(len(p.text), r.output, "response")])
    parser = SpanParser(data_cfg.spacy_model, cache_dir=data_cfg.span_cache_dir)
    texts = sorted({t for sg in segs for _, t, _ in sg if t})
    parsed = dict(zip(texts, parser.parse(texts, progress=progress)))
    log.info("spans: %s", parser.stats)
    return prompts, [_units(sg, parsed, settings.symbol_words) for sg in segs]


def _units(segments, parsed, symbol_words: str) -> Units:
    """Words (of every segment, in text order) then phrases, offset into the training text."""
    chars, kinds, names = [], [], []
    for gran in ("word", "phrase"):
        for off, text, name in segments:
            if not text:
                continue
            u = parsed[text]
            spans = u.word_spans(symbol_words) if gran == "word" else u.phrases
            chars.append(np.asarray(spans, dtype=np.int64).reshape(-1, 2) + off)
            kinds += ["word"] * len(spans) if gran == "word" else list(u.phrase_kinds())
            names += [name] * len(spans)
    return Units(np.concatenate(chars) if chars else np.zeros((0, 2), np.int64), np.asarray(kinds, dtype=str),
                 np.asarray(names, dtype=str))


# ------------------------------------------------------------------------------ cross-tokenizer
@dataclass
class CrossExample(Example):
    """An :class:`Example` of the student's tokenisation plus the teacher's tokenisation of the same text
    (``objective.cross_tokenizer``); ``spans[g][k]`` and ``teacher_spans[g][k]`` are the same unit's characters."""

    teacher_input_ids: list[int] = field(default_factory=list)
    teacher_labels: list[int] = field(default_factory=list)
    teacher_spans: dict[str, np.ndarray] = field(default_factory=dict)


def _teacher_prompt(rec, teacher_tokenizer, data_cfg, prompt: Prompt) -> tuple[Prompt, str]:
    """(teacher's prompt, the template its text is encoded with): the student's ``prompt`` itself
    (``data.teacher_template: shared``), or the same instruction and input in the teacher's chat template (``own``)."""
    if data_cfg.teacher_template == "shared":
        return prompt, data_cfg.template
    if getattr(teacher_tokenizer, "chat_template", None) is None:
        raise DataError("data.teacher_template is 'own' but the teacher's tokenizer has no chat template; use "
                        "data.teacher_template: shared (the teacher then reads the student's rendering)")
    return format_prompt(rec, teacher_tokenizer, "chat", data_cfg.system_prompt), "chat"


def _units_in(units: Units, prompt: Prompt, other: Prompt) -> tuple[Units, np.ndarray]:
    """(``units`` moved into ``other``'s rendering of the same record, [K] mappable): a unit of the instruction,
    input or response keeps its characters and moves by the offset of its segment in each rendering; a unit on
    markup, or on content that ``other``'s template rewrote (``content_found`` False), has no counterpart (it gets
    the empty span [0, 0) and ``False``)."""
    if other is prompt:
        return units, np.ones(len(units.chars), bool)
    shift = {"response": len(other.text) - len(prompt.text)}
    at = {kind: off for off, _, kind in other.segments if kind in ("instruction", "input")}
    for off, _, kind in prompt.segments:
        if kind in at:
            shift[kind] = at[kind] - off
    mappable = np.asarray([str(s) in shift for s in units.segments], dtype=bool)
    moved = units.chars + np.asarray([shift.get(str(s), 0) for s in units.segments], np.int64).reshape(-1, 1)
    moved[~mappable] = 0
    return Units(moved, units.kinds, units.segments), mappable


class CrossTokenized(NamedTuple):
    example: "CrossExample"
    text: str  # the student's rendering
    tokens: np.ndarray | None  # [K, 2] each unit's token range in the student's sequence
    teacher_tokens: np.ndarray | None  # [K, 2] ... in the teacher's
    kept: np.ndarray | None  # [K] units both tokenisations represent
    teacher_text: str  # the teacher's rendering (the student's text unless teacher_template: own)
    teacher_chars: np.ndarray | None  # [K, 2] the units' character spans in teacher_text


def _cross_tokenize(rec, tokenizer, teacher_tokenizer, data_cfg, units, truncated_units, stats,
                    prompt: Prompt | None = None) -> CrossTokenized:
    """The record rendered once as text by the student's template, tokenised by both tokenizers, each unit's
    character span mapped to a token range in each; a unit kept only where both tokenisations represent it
    (counted in ``units_cross_dropped`` otherwise). With ``data.teacher_template: own`` the teacher's text is the
    same instruction, input and response in the teacher's chat template, and each unit's characters are moved
    there by its segment's offset (:func:`_units_in`). ``prompt``: the student's rendering, if already made."""
    prompt = prompt or format_prompt(rec, tokenizer, data_cfg.template, data_cfg.system_prompt)
    t_prompt, t_template = _teacher_prompt(rec, teacher_tokenizer, data_cfg, prompt)
    args = (data_cfg.system_prompt, data_cfg.max_prompt_length, data_cfg.max_length)
    ex, text, tok_s, kept_s = _tokenize(rec, tokenizer, data_cfg.template, *args, stats, units, truncated_units,
                                        prompt=prompt)
    t_units, mappable = _units_in(units, prompt, t_prompt) if units is not None else (None, None)
    t_ex, t_text, tok_t, kept_t = _tokenize(rec, teacher_tokenizer, t_template, *args, DataStats(), t_units,
                                            truncated_units, prompt=t_prompt)
    t_chars = t_units.chars if t_units is not None else None
    if units is None:
        return CrossTokenized(CrossExample(ex.input_ids, ex.labels, {}, t_ex.input_ids, t_ex.labels, {}), text, tok_s,
                              tok_t, kept_s, t_text, t_chars)
    kept_t = kept_t & mappable
    kept = kept_s & kept_t
    stats.units_cross_dropped += int((kept_s ^ kept_t).sum())
    word = units.kinds == "word"
    spans = {"word": tok_s[kept & word], "phrase": tok_s[kept & ~word]}
    t_spans = {"word": tok_t[kept & word], "phrase": tok_t[kept & ~word]}
    return CrossTokenized(CrossExample(ex.input_ids, ex.labels, spans, t_ex.input_ids, t_ex.labels, t_spans), text,
                          tok_s, tok_t, kept, t_text, t_chars)


def build_cross_examples(
    records: list[Record], tokenizer, teacher_tokenizer, data_cfg, *, spans: SpanSettings | None = None,
    stats: DataStats | None = None, progress: bool = True,
) -> list[CrossExample]:
    """:func:`build_examples` for teacher and student with different tokenizers (``objective.cross_tokenizer``,
    docs/method.md): the student's template renders each record once; both tokenizers tokenise that text; the
    units are parsed once and mapped onto both tokenisations by their characters. ``data.teacher_template: own``:
    the teacher tokenises its own chat template around the same instruction, input and response instead, and the
    units' characters are moved into that rendering segment by segment."""
    stats = stats if stats is not None else DataStats()
    prompts, units = [None] * len(records), [None] * len(records)
    if spans is not None:
        prompts, units = _record_units(records, tokenizer, data_cfg, spans, stats, progress)
    truncated = spans.truncated_units if spans else "drop"
    out = [_cross_tokenize(r, tokenizer, teacher_tokenizer, data_cfg, u, truncated, stats, prompt=p).example
           for r, p, u in zip(records, prompts, units)]
    stats.records += len(out)
    return out


def describe_cross_examples(records, tokenizer, teacher_tokenizer, data_cfg, spans: SpanSettings):
    """:func:`describe_examples` with both tokenisations: each unit also carries ``teacher_token_start`` /
    ``teacher_token_end`` (``mtakd spans --show`` with ``objective.cross_tokenizer``). With
    ``data.teacher_template: own`` the record also has ``teacher_text`` (the teacher's rendering) and each unit
    ``teacher_char_start`` / ``teacher_char_end`` (its characters there)."""
    stats = DataStats()
    own = data_cfg.teacher_template == "own"
    for r, p, u in zip(records, *_record_units(records, tokenizer, data_cfg, spans, stats, False)):
        _, text, tok, t_tok, kept, t_text, t_chars = _cross_tokenize(r, tokenizer, teacher_tokenizer, data_cfg, u,
                                                                     spans.truncated_units, stats, prompt=p)
        shown = [
            {"kind": str(u.kinds[k]), "segment": str(u.segments[k]), "char_start": int(u.chars[k, 0]),
             "char_end": int(u.chars[k, 1]), "token_start": int(tok[k, 0]), "token_end": int(tok[k, 1]),
             "teacher_token_start": int(t_tok[k, 0]), "teacher_token_end": int(t_tok[k, 1]),
             **({"teacher_char_start": int(t_chars[k, 0]), "teacher_char_end": int(t_chars[k, 1])} if own else {}),
             "text": text[u.chars[k, 0] : u.chars[k, 1]]}
            for k in np.flatnonzero(kept)
        ]
        yield {"text": text, **({"teacher_text": t_text} if own else {}), "units": shown}


class CrossCollator:
    """:class:`Collator` of both tokenisations: the student's keys as usual, the teacher's prefixed ``teacher_``
    (``teacher_input_ids``, ``teacher_attention_mask``, ``teacher_labels``, ``teacher_word_spans``, ...), padded with
    the teacher's pad id. Both sides have the same unit count per batch, unit k being the same characters."""

    def __init__(self, pad_token_id: int, teacher_pad_token_id: int, pad_to_multiple_of: int | None = 8):
        self.student = Collator(pad_token_id, pad_to_multiple_of)
        self.teacher = Collator(teacher_pad_token_id, pad_to_multiple_of)

    def __call__(self, examples: list[CrossExample]) -> dict[str, torch.Tensor]:
        batch = self.student(examples)
        teacher = self.teacher([Example(e.teacher_input_ids, e.teacher_labels, e.teacher_spans) for e in examples])
        batch.update({f"teacher_{k}": v for k, v in teacher.items()})
        return batch


# ---------------------------------------------------------------------------------- collation
def length_order(lengths) -> list[int]:
    """Indices of items in order of length, shortest first (a stable sort: equal lengths keep their order)."""
    return sorted(range(len(lengths)), key=lambda i: lengths[i])


def length_batches(lengths, batch_size: int) -> list[list[int]]:
    """Indices of items grouped ``batch_size`` at a time in order of length (:func:`length_order`): batches of
    similar length, so little padding. Used wherever values are per item and batching must not change them."""
    order = length_order(lengths)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


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


# ------------------------------------------------------------------------------------ checks
def _hub_dataset(source: str) -> bool:
    """A source :func:`mtakd.data.read_rows` loads as an HF dataset id (no such local file)."""
    path = Path(source)
    return not path.is_file() and "/" in source and not source.startswith((".", "/")) and not path.suffix


def check_data_files(cfg: RunConfig, missing_ok: bool = False) -> list[str]:
    """Every local data file the run reads (data.train, data.validation, the calibration data of a student built
    from the teacher) exists and parses into records, before any model is loaded; hub dataset ids are left to
    the run (loading one may download it). ``missing_ok`` (--dry-run: a pipeline's earlier step may not have
    written a file yet): missing files are returned instead of stopping; a file that exists must still parse."""
    sources = [*cfg.data.train, *cfg.data.validation]
    ft = cfg.student.from_teacher
    if ft is not None:
        sources += ft.calibration.data
    missing = []
    for src in dict.fromkeys(sources):
        if missing_ok and not Path(src).is_file() and not _hub_dataset(src):
            missing.append(src)
        elif not _hub_dataset(src):
            load_records(src)  # DataError: the file and line, and what is wrong
    return missing
