"""`mtakd spans`: parse a config's data into words and phrases once and cache them (MTA_SPEC §3), or show
the units of the first training examples (``--show N``, ``--json``) to check them on your data and template."""

from __future__ import annotations

import json

from .config import ConfigError, add_config_command, load_config


def _cmd_spans(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.show is None:
        if args.json:
            raise ConfigError("--json needs --show N (the number of training examples to print)")
        return _precompute(cfg)
    if args.show < 1:
        raise ConfigError(f"--show must be a positive number of examples, got {args.show}")
    from .data import SpanSettings, describe_examples, load_records
    from .run import _hold_out
    from .models import load_tokenizer

    records = [r for src in cfg.data.train for r in load_records(src)]
    if cfg.data.validation_size:  # the same split as training
        records, _ = _hold_out(records, cfg.data.validation_size)
    mta = cfg.objective.mta
    settings = SpanSettings.from_mta(mta) if mta is not None else SpanSettings()
    if cfg.objective.cross_tokenizer:  # both tokenisations: units also carry teacher_token_start/end
        from .data import describe_cross_examples

        s_tok = load_tokenizer(cfg.student) if cfg.student.from_teacher is None else load_tokenizer(cfg.teacher)
        examples = describe_cross_examples(records[: args.show], s_tok, load_tokenizer(cfg.teacher), cfg.data, settings)
    else:
        examples = describe_examples(records[: args.show], load_tokenizer(cfg.teacher), cfg.data, settings)
    for i, (rec, ex) in enumerate(zip(records, examples), 1):
        if args.json:
            print(json.dumps(ex, ensure_ascii=False))
        else:
            print(_readable(ex, f"example {i} ({rec.where})"))
    return 0


def _precompute(cfg) -> int:
    """Parse what training will parse and fill the span cache: with MTA on, the examples are built exactly as
    ``mtakd distill`` builds them (so rendered prompt texts, e.g. with ``units_on_markup``, are parsed too);
    without MTA, the records' instruction, input and output texts."""
    from .data import load_records
    from .spans import SpanParser

    if cfg.objective.mta_enabled:
        from .run import build_datasets
        from .models import load_tokenizer

        cross = cfg.objective.cross_tokenizer
        tok = load_tokenizer(cfg.student if cross and cfg.student.from_teacher is None else cfg.teacher)
        train, val, _ = build_datasets(cfg, tok, teacher_tokenizer=load_tokenizer(cfg.teacher) if cross else None)
        print(f"{len(train) + (len(val) if val is not None else 0)} examples parsed as training parses them "
              f"(span cache: {cfg.data.span_cache_dir or 'default'})")
        return 0

    texts = sorted({t for src in cfg.data.train + cfg.data.validation for r in load_records(src)
                    for t in (r.instruction, r.input, r.output) if t})
    parser = SpanParser(cfg.data.spacy_model, cache_dir=cfg.data.span_cache_dir)
    units = parser.parse(texts)
    words = sum(len(u.words) for u in units)
    print(f"{words} words, {sum(len(u.phrases) for u in units)} phrases in {parser.stats}")
    return 0


def bracket(text: str, spans: list[tuple[int, int, str, str]]) -> str:
    """``text`` with each ``(start, end, open, close)`` span wrapped in its markers; nested spans nest."""
    marks = [(a, 1, -b, o) for a, b, o, _ in spans] + [(b, 0, -a, c) for a, b, _, c in spans]
    out, pos = [], 0
    for at, _, _, mark in sorted(marks):  # at one position: closings first, inner ones before outer ones
        out += [text[pos:at], mark]
        pos = at
    return "".join(out + [text[pos:]])


def _readable(ex: dict, title: str) -> str:
    units = ex["units"]
    words = [(u["char_start"], u["char_end"], "[", "]") for u in units if u["kind"] == "word"]
    phrases = [(u["char_start"], u["char_end"], *("[]" if u["kind"] == "np" else "{}")) for u in units
               if u["kind"] != "word"]
    return (f"=== {title}: {len(words)} words, {len(phrases)} phrases (only units that reach training)\n"
            f"--- words [..]\n{bracket(ex['text'], words)}\n"
            f"--- phrases: noun [..], verb {{..}}\n{bracket(ex['text'], phrases)}\n")


def add_parser(sub) -> None:
    s = add_config_command(
        sub, "spans", help="parse the config's data into words/phrases once and cache them; --show N prints the units",
        description="Without --show: parse every instruction, input and output of data.train and data.validation "
        "with spaCy\nand cache the words and phrases (training then reads the cache).\n"
        "With --show N: render the first N training examples as training does (template, truncation,\n"
        "objective.mta.span_scope / truncated_units / units_on_markup / symbol_words) and print their units:\n"
        "the text with words and phrases bracketed, or with --json one object per line:\n"
        '  {"text": rendered text, "units": [{"kind": word|np|vp, "segment": instruction|input|response|markup,\n'
        '   "char_start", "char_end", "token_start", "token_end", "text"}]}\n'
        "where text == rendered[char_start:char_end] and [token_start, token_end) are the positions in the\n"
        "example's input_ids (after truncation) that the unit pools. --show loads the teacher's tokenizer only;\n"
        "with objective.cross_tokenizer it also loads the student's, renders with it, and each unit also has\n"
        "teacher_token_start/teacher_token_end in the teacher's tokenisation of the same text.",
        config_help="run config (see configs/): its data section (files, template, lengths, spaCy model, cache) and "
        "objective.mta span switches are used; --show also reads teacher for the tokenizer",
    )
    s.add_argument("--show", type=int, metavar="N", help="print the units of the first N training examples")
    s.add_argument("--json", action="store_true", help="with --show: one JSON object per example and line")
    s.set_defaults(func=_cmd_spans)
