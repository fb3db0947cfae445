"""Data loading errors, prompt formatting, response-only labels, span mapping and collation."""

import json
import logging
import re

import numpy as np
import pytest
import torch

from mtakd.config import DataConfig, build_config
from mtakd.data import (
    Collator, DataError, DataStats, Record, SpanSettings, build_examples, describe_examples, format_prompt,
    length_batches, load_records, tokenize,
)
from tests.conftest import build_tokenizer, needs_spacy


def _write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def test_load_records_aliases_and_empty_outputs(tmp_path):
    p = _write(tmp_path, [
        json.dumps({"instruction": "a", "input": "b", "output": "c"}),
        json.dumps({"instruction": "d", "context": "e", "response": "f"}),  # Dolly
        json.dumps({"prompt": "g", "completion": "h"}),
        json.dumps({"instruction": "i", "output": "   "}),
    ])
    stats = DataStats()
    recs = load_records(str(p), stats=stats)
    assert [(r.instruction, r.input, r.output) for r in recs] == [("a", "b", "c"), ("d", "e", "f"), ("g", "", "h")]
    assert stats.skipped_empty_output == 1 and recs[0].where.endswith("d.jsonl:1")


@pytest.mark.parametrize("lines,match", [
    (['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": '], r"d\.jsonl:2: malformed JSON"),
    (['{"instruction": "a"}'], r"d\.jsonl:1: missing required field\(s\): output"),
    (['{"output": "a"}'], r"missing required field\(s\): instruction"),
    (['[1, 2]'], "expected a JSON object"),
    (['{"instruction": 3, "output": "b"}'], "must be a string"),
    ([''], "no usable records"),
    (['{"instruction": "a", "output": ""}'], "no usable records"),
])
def test_load_records_errors(tmp_path, lines, match):
    with pytest.raises(DataError, match=match):
        load_records(str(_write(tmp_path, lines)))


def test_missing_file():
    with pytest.raises(DataError, match="not found"):
        load_records("nope/missing.jsonl")


@pytest.mark.parametrize("template", ["chat", "alpaca", "raw"])
def test_format_prompt_segments_point_at_content(tiny_tokenizer, template):
    rec = Record("Sort these words.", "pear apple", "apple pear", "x:1")
    p = format_prompt(rec, tiny_tokenizer, template)
    content = [(p.text[o : o + len(s)], k) for o, s, k in p.segments if k != "markup"]
    assert content == [("Sort these words.", "instruction"), ("pear apple", "input")]
    assert "".join(s for _, s, _ in p.segments) == p.text  # the pieces tile the text
    if template == "alpaca":
        assert p.text.startswith("Below is an instruction") and p.text.endswith("### Response:\n")
    if template == "chat":
        assert "<|user|>" in p.text and p.text.endswith("<|assistant|>\n")


def test_tokenize_masks_prompt_and_appends_eos(tiny_tokenizer):
    rec = Record("Explain why the sky is blue.", "", "The sky is blue.", "x:1")
    stats = DataStats()
    ex = tokenize(rec, tiny_tokenizer, template="alpaca", system_prompt=None, max_prompt_length=200, max_length=300,
                  stats=stats)
    prompt = format_prompt(rec, tiny_tokenizer, "alpaca").text
    n_prompt = len(tiny_tokenizer(prompt)["input_ids"])
    assert ex.labels[:n_prompt] == [-100] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert ex.input_ids[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(ex.input_ids[n_prompt:-1]) == "The sky is blue."
    assert stats.prompt_truncated == stats.response_truncated == 0


def test_truncation_is_counted_and_keeps_prompt_end(tiny_tokenizer):
    rec = Record("word " * 60, "", "answer " * 40, "x:1")
    stats = DataStats()
    ex = tokenize(rec, tiny_tokenizer, template="alpaca", system_prompt=None, max_prompt_length=20, max_length=30,
                  stats=stats)
    assert stats.prompt_truncated == 1 and stats.response_truncated == 1
    assert len(ex.input_ids) == 30 and ex.labels.count(-100) == 20
    assert tiny_tokenizer.decode(ex.input_ids[:20]).endswith("### Response:\n")


def _reference_word_tokens(tokenizer, text, add_special_tokens=True):
    """Each ``\\w+`` word's token range ``[first, last + 1)``, scanning the offsets token by token."""
    offsets = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)["offset_mapping"]
    out = []
    for m in re.finditer(r"\w+", text):
        members = [t for t, (s, e) in enumerate(offsets) if s < e and s < m.end() and e > m.start()]
        out.append((members[0], members[-1] + 1))
    return out


@needs_spacy
@pytest.mark.parametrize("mode", ["drop", "keep"])
def test_truncation_drops_or_keeps_the_units_it_cuts(tiny_tokenizer, tmp_path, mode):
    # unseen words split into many byte-level pieces; truncation is placed inside a word on both sides
    rec = Record("zygomorphic xylophones " * 6, "", "quixotic zephyrs " * 6, "x:1")
    prompt = format_prompt(rec, tiny_tokenizer, "raw").text
    ref = _reference_word_tokens(tiny_tokenizer, prompt + rec.output)
    n_prompt = len(tiny_tokenizer(prompt)["input_ids"])
    multi = [(a, b) for a, b in ref if b - a > 2]
    drop = next(a for a, b in multi if a > 3) + 2  # 2 tokens into a prompt word
    end = next(a for a, b in multi if a > n_prompt + 3) + 2  # 2 tokens into a response word
    cfg = DataConfig(train=["x"], template="raw", max_prompt_length=n_prompt - drop, max_length=end - drop,
                     span_cache_dir=str(tmp_path))
    stats = DataStats()
    ex = build_examples([rec], tiny_tokenizer, cfg, spans=SpanSettings(truncated_units=mode), stats=stats,
                        progress=False)[0]
    assert len(ex.input_ids) == end - drop and stats.prompt_truncated == stats.response_truncated == 1
    assert stats.units_truncated >= 2  # one word cut at each end (and the phrases around them)
    if mode == "drop":  # whole words only, at their positions in the truncated sequence
        expected = [(a - drop, b - drop) for a, b in ref if a >= drop and b <= end]
    else:  # the two cut words keep the tokens that remain
        expected = [(max(a, drop) - drop, min(b, end) - drop) for a, b in ref if b > drop and a < end]
    assert [tuple(r) for r in ex.spans["word"].tolist()] == expected
    assert (ex.spans["phrase"][:, 0] >= 0).all() and (ex.spans["phrase"][:, 1] <= len(ex.input_ids)).all()


@needs_spacy
@pytest.mark.parametrize("template,instruction,inp,marker", [
    ("alpaca", "Write a response", "Instruction", "### Instruction:\n"),
    ("alpaca", "request", "", "### Instruction:\n"),
    ("alpaca", "Sort them", "Input", "### Instruction:\n"),  # "Input" also in the marker after the instruction
    ("chat", "assistant", "", "<|user|>\n"),
])
def test_units_land_on_the_content_not_on_the_template(tiny_tokenizer, tmp_path, template, instruction, inp, marker):
    """Content that also occurs in the template's text gets its units on the content (issue 12, bug 3)."""
    rec = Record(instruction, inp, "Done.", "x:1")
    p = format_prompt(rec, tiny_tokenizer, template)
    start = p.text.index(marker) + len(marker)  # the content follows the template's own marker
    assert p.text[start:].startswith(instruction)
    content = {k: o for o, _, k in p.segments if k != "markup"}
    assert content["instruction"] == start
    if inp:
        assert content["input"] == p.text.index("### Input:\n") + len("### Input:\n")
    cfg = DataConfig(train=["x"], template=template, span_cache_dir=str(tmp_path))
    ex = build_examples([rec], tiny_tokenizer, cfg, spans="all", progress=False)[0]
    offsets = tiny_tokenizer(p.text + rec.output, add_special_tokens=template != "chat",
                             return_offsets_mapping=True)["offset_mapping"]
    words = [(offsets[a][0], tiny_tokenizer.decode(ex.input_ids[a:b]).strip()) for a, b in ex.spans["word"]]
    assert [w for _, w in words] == re.findall(r"\w+", f"{instruction} {inp} Done")
    assert min(s for s, _ in words) >= start  # none on the header


def _upper_case_chat_tokenizer():
    tok = build_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] | upper }}<|endoftext|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    return tok


@needs_spacy
def test_chat_template_that_rewrites_the_content_is_counted(tmp_path, caplog):
    tok = _upper_case_chat_tokenizer()
    rows = [{"instruction": f"Explain why the sky is blue {i}.", "output": "Light scatters."} for i in range(3)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = build_config({"teacher": {"path": "t"}, "student": {"path": "s"},
                        "data": {"train": str(data), "template": "chat", "span_cache_dir": str(tmp_path)},
                        "objective": {"base": "skl", "mta": {}}})
    from mtakd.run import build_datasets

    with caplog.at_level(logging.WARNING, logger="mtakd.data"):
        train, _, stats = build_datasets(cfg, tok, progress=False)
    assert stats.content_not_found == 3
    warnings = [r.getMessage() for r in caplog.records if "rewrites" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("3 of 3 examples")
    for ex in train.items:  # no prompt units; the response keeps its two words
        first_resp = next(i for i, l in enumerate(ex.labels) if l != -100)
        assert ex.spans["word"][:, 0].min() >= first_resp and len(ex.spans["word"]) == 2
    # with units on the markup, the whole (rewritten) prompt is parsed as markup
    shown = list(describe_examples(load_records(str(data))[:1], tok, cfg.data, SpanSettings(units_on_markup=True)))
    assert {u["segment"] for u in shown[0]["units"]} == {"markup", "response"}
    assert "EXPLAIN" in [u["text"] for u in shown[0]["units"]]


@needs_spacy
def test_span_switches_reach_the_examples_from_the_config(tiny_tokenizer, tmp_path):
    """objective.mta.units_on_markup / symbol_words, threaded through run.build_datasets."""
    from mtakd.run import build_datasets

    rec = {"instruction": "Sort these words — quickly!", "output": "apple, pear."}
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(rec) + "\n")

    def words(**mta):
        cfg = build_config({"teacher": {"path": "t"}, "student": {"path": "s"},
                            "data": {"train": str(data), "template": "alpaca", "span_cache_dir": str(tmp_path)},
                            "objective": {"base": "skl", "mta": mta}})
        ex = build_datasets(cfg, tiny_tokenizer, progress=False)[0].items[0]
        return [tiny_tokenizer.decode(ex.input_ids[a:b]).strip() for a, b in ex.spans["word"]]

    text = format_prompt(Record(rec["instruction"], "", "", "x"), tiny_tokenizer, "alpaca").text + rec["output"]
    assert words() == ["Sort", "these", "words", "quickly", "apple", "pear"]
    assert words(units_on_markup=True) == re.findall(r"\w+", text)  # the Alpaca header's words too
    assert words(units_on_markup=True)[:3] == ["Below", "is", "an"]
    assert words(symbol_words="keep") == ["Sort", "these", "words", "—", "quickly", "!", "apple", ",", "pear", "."]


@needs_spacy
def test_spans_map_onto_the_tokens_of_the_text(tiny_tokenizer, tmp_path):
    recs = [Record("Explain why the sky is blue.", "", "The quick brown fox jumps over the lazy dog.", "x:1")]
    cfg = DataConfig(train=["x"], template="chat", span_cache_dir=str(tmp_path))
    ex = build_examples(recs, tiny_tokenizer, cfg, spans="all", progress=False)[0]
    text = tiny_tokenizer.decode
    words = [text(ex.input_ids[a:b]).strip() for a, b in ex.spans["word"]]
    assert words == ["Explain", "why", "the", "sky", "is", "blue", "The", "quick", "brown", "fox", "jumps", "over",
                     "the", "lazy", "dog"]
    phrases = [text(ex.input_ids[a:b]).strip() for a, b in ex.spans["phrase"]]
    assert "The quick brown fox" in phrases and "the lazy dog" in phrases and "jumps" in phrases
    resp = build_examples(recs, tiny_tokenizer, cfg, spans="response", progress=False)[0]
    first_resp = ex.labels.index(next(l for l in ex.labels if l != -100))
    assert resp.spans["word"][:, 0].min() >= first_resp and len(resp.spans["word"]) == 9


def test_collator_pads_right_and_builds_dense_spans():
    from mtakd.data import Example

    a = Example([5, 6, 7], [-100, 6, 7], {"word": np.array([[0, 1], [1, 3]])})
    b = Example([8, 9, 10, 11, 12], [-100, -100, 10, 11, 12], {"word": np.array([[2, 5]])})
    batch = Collator(pad_token_id=0, pad_to_multiple_of=None)([a, b])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 10, 11, 12]]
    spans = batch["word_spans"]
    assert spans.shape == (2, 2, 5) and spans.dtype == torch.bool
    assert spans[0].int().tolist() == [[1, 0, 0, 0, 0], [0, 1, 1, 0, 0]]
    assert spans[1].int().tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]]  # second span is padding


def test_length_batches_group_similar_lengths_and_cover_every_item_once():
    lengths = [5, 1, 9, 3, 3, 7, 2]
    got = length_batches(lengths, 3)
    assert got == [[1, 6, 3], [4, 0, 5], [2]]  # shortest first, ties in input order
    assert sorted(i for b in got for i in b) == list(range(len(lengths)))
    assert length_batches([], 4) == []
