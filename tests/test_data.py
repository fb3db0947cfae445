"""Data loading errors, prompt formatting, response-only labels, span mapping and collation."""

import json

import numpy as np
import pytest
import torch

from mtakd.config import DataConfig
from mtakd.data import Collator, DataError, DataStats, Record, build_examples, format_prompt, load_records, tokenize
from tests.conftest import needs_spacy


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
    assert [p.text[o : o + len(s)] for o, s in p.segments] == ["Sort these words.", "pear apple"]
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


@needs_spacy
def test_spans_map_onto_the_tokens_of_the_text(tiny_tokenizer, tmp_path):
    recs = [Record("Explain why the sky is blue.", "", "The quick brown fox jumps over the lazy dog.", "x:1")]
    cfg = DataConfig(train=["x"], template="chat", span_cache_dir=str(tmp_path))
    ex = build_examples(recs, tiny_tokenizer, cfg, span_scope="all", progress=False)[0]
    text = tiny_tokenizer.decode
    words = [text(ex.input_ids[a:b]).strip() for a, b in ex.spans["word"]]
    assert words == ["Explain", "why", "the", "sky", "is", "blue", "The", "quick", "brown", "fox", "jumps", "over",
                     "the", "lazy", "dog"]
    phrases = [text(ex.input_ids[a:b]).strip() for a, b in ex.spans["phrase"]]
    assert "The quick brown fox" in phrases and "the lazy dog" in phrases and "jumps" in phrases
    resp = build_examples(recs, tiny_tokenizer, cfg, span_scope="response", progress=False)[0]
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
