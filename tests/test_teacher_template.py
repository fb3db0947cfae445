"""``data.teacher_template`` (issue 18 item 1): in a cross-tokenizer run the teacher reads the same instruction,
input and response either in the student's rendering (``shared``, the default) or in its own chat template
(``own``); the semantic units' characters are moved into the teacher's rendering segment by segment."""

from __future__ import annotations

import numpy as np
import pytest

from mtakd.config import ConfigError, DataConfig, build_config
from mtakd.data import (
    DataError,
    DataStats,
    Record,
    SpanSettings,
    build_cross_examples,
    describe_cross_examples,
    format_prompt,
)
from tests.conftest import build_tokenizer, needs_spacy
from tests.test_cross_tokenizer import build_other_tokenizer, cross_run_config, cross_student_dir  # noqa: F401

# Plain words without punctuation next to them: every unit is whole tokens in both tokenizers, so the tokens of
# a unit's range decode to exactly the unit's text (a range shifted by even one character would not)
RECORDS = [
    Record("Explain why the sky is blue", "", "The sky looks blue because air scatters blue light more than red "
           "light", "a:1"),
    Record("Write a short poem about the sea", "Use simple words", "The sea is deep and the moon is bright over "
           "the water at night", "a:2"),
    Record("List three ways to save energy at home", "", "Turn off the lights and close the windows and use less "
           "water", "a:3"),
]


@pytest.fixture(scope="module")
def pair():
    """(student, teacher) tokenizers with different vocabularies and different chat templates."""
    student, teacher = build_other_tokenizer(), build_tokenizer()
    student.chat_template = (  # another layout than the teacher's <|user|> ... <|assistant|> template
        "[system prompt]\n{% for m in messages %}### {{ m['role'] | upper }}\n{{ m['content'] }}\n\n{% endfor %}"
        "{% if add_generation_prompt %}### ASSISTANT\n{% endif %}"
    )
    return student, teacher


def _data_cfg(tmp_path, **kw):
    return DataConfig(train=["x"], template="chat", max_prompt_length=200, max_length=400,
                      span_cache_dir=str(tmp_path / "spans"), **kw)


def _check_units(ex, s_tok, t_tok):
    """Every unit: non-empty token ranges in both tokenisations that decode to exactly the unit's text."""
    s_ids = s_tok(ex["text"], add_special_tokens=False)["input_ids"]
    t_ids = t_tok(ex["teacher_text"], add_special_tokens=False)["input_ids"]
    for u in ex["units"]:
        assert u["token_end"] > u["token_start"] and u["teacher_token_end"] > u["teacher_token_start"], u
        assert ex["teacher_text"][u["teacher_char_start"]:u["teacher_char_end"]] == u["text"]
        assert s_tok.decode(s_ids[u["token_start"]:u["token_end"]]).strip() == u["text"], ("student", u)
        assert t_tok.decode(t_ids[u["teacher_token_start"]:u["teacher_token_end"]]).strip() == u["text"], ("teacher", u)


@needs_spacy
def test_own_template_maps_every_unit_into_both_renderings(tmp_path, pair):
    s_tok, t_tok = pair
    cfg = _data_cfg(tmp_path, teacher_template="own")
    shown = list(describe_cross_examples(RECORDS, s_tok, t_tok, cfg, SpanSettings()))
    segments, moved = set(), 0
    for rec, ex in zip(RECORDS, shown):
        # each side reads its own chat template around the same content
        assert ex["text"] == format_prompt(rec, s_tok, "chat").text + rec.output
        assert ex["teacher_text"] == format_prompt(rec, t_tok, "chat").text + rec.output
        assert ex["text"].startswith("[system prompt]") and ex["teacher_text"].startswith("<|user|>")
        n_words = len((rec.instruction + " " + rec.input + " " + rec.output).split())
        assert sum(u["kind"] == "word" for u in ex["units"]) == n_words  # nothing dropped
        _check_units(ex, s_tok, t_tok)
        segments |= {u["segment"] for u in ex["units"]}
        moved += sum(u["teacher_char_start"] != u["char_start"] for u in ex["units"])
        # the token ranges really differ between the two tokenisations
        assert any((u["token_start"], u["token_end"]) != (u["teacher_token_start"], u["teacher_token_end"])
                   for u in ex["units"])
    assert segments == {"instruction", "input", "response"}
    assert moved > 0


@needs_spacy
def test_own_template_examples_tokenise_the_teachers_rendering(tmp_path, pair):
    s_tok, t_tok = pair
    stats = DataStats()
    own = build_cross_examples(RECORDS, s_tok, t_tok, _data_cfg(tmp_path, teacher_template="own"),
                               spans=SpanSettings(), stats=stats, progress=False)
    shared = build_cross_examples(RECORDS, s_tok, t_tok, _data_cfg(tmp_path), spans=SpanSettings(), progress=False)
    assert stats.units_cross_dropped == 0
    for rec, a, b in zip(RECORDS, own, shared):
        t_text = format_prompt(rec, t_tok, "chat").text + rec.output
        s_text = format_prompt(rec, s_tok, "chat").text + rec.output
        assert a.teacher_input_ids == t_tok(t_text, add_special_tokens=False)["input_ids"] + [t_tok.eos_token_id]
        assert b.teacher_input_ids == t_tok(s_text, add_special_tokens=False)["input_ids"] + [t_tok.eos_token_id]
        # the student's side does not depend on the switch
        assert a.input_ids == b.input_ids and a.labels == b.labels
        for g in ("word", "phrase"):
            assert np.array_equal(a.spans[g], b.spans[g]) and len(a.teacher_spans[g]) == len(a.spans[g]) > 0
        # the teacher's labels are its tokens of the response, whichever rendering
        for ex in (a, b):
            resp = [i for i, l in zip(ex.teacher_input_ids, ex.teacher_labels) if l != -100]
            assert t_tok.decode(resp, skip_special_tokens=True) == rec.output


@needs_spacy
def test_units_on_markup_exist_on_the_students_side_only_and_are_dropped(tmp_path, pair):
    s_tok, t_tok = pair
    settings = SpanSettings(units_on_markup=True)
    stats_shared, stats_own = DataStats(), DataStats()
    shared = build_cross_examples(RECORDS, s_tok, t_tok, _data_cfg(tmp_path), spans=settings, stats=stats_shared,
                                  progress=False)
    own = build_cross_examples(RECORDS, s_tok, t_tok, _data_cfg(tmp_path, teacher_template="own"), spans=settings,
                               stats=stats_own, progress=False)
    shown = list(describe_cross_examples(RECORDS, s_tok, t_tok, _data_cfg(tmp_path), settings))
    markup = sum(u["segment"] == "markup" for ex in shown for u in ex["units"])
    assert markup > 0 and stats_shared.units_cross_dropped == 0
    assert stats_own.units_cross_dropped == markup
    assert sum(len(e.spans["word"]) + len(e.spans["phrase"]) for e in own) == \
        sum(len(e.spans["word"]) + len(e.spans["phrase"]) for e in shared) - markup


def test_content_the_teachers_template_rewrites_has_no_units_there(pair):
    from mtakd.data import Units, _cross_tokenize

    s_tok, t_tok = pair
    t_tok = build_tokenizer()
    t_tok.chat_template = ("{% for m in messages %}<|user|>\n{{ m['content'] | lower }}<|endoftext|>\n{% endfor %}"
                           "<|assistant|>\n")
    rec = Record("Explain why the sky is blue", "", "The sky", "x")
    cfg = DataConfig(train=["x"], template="chat", max_prompt_length=100, max_length=200, teacher_template="own")
    text = format_prompt(rec, s_tok, "chat").text
    chars = np.asarray([[text.index("Explain"), text.index("Explain") + 7], [len(text), len(text) + 3]])
    units = Units(chars, np.asarray(["word", "word"]), np.asarray(["instruction", "response"]))
    stats = DataStats()
    ex, _, _, tok_t, kept, _, _ = _cross_tokenize(rec, s_tok, t_tok, cfg, units, "drop", stats)
    assert kept.tolist() == [False, True] and stats.units_cross_dropped == 1
    resp = [i for i, l in zip(ex.teacher_input_ids, ex.teacher_labels) if l != -100]
    assert ex.teacher_input_ids[tok_t[1, 0]:tok_t[1, 1]] == t_tok("The", add_special_tokens=False)["input_ids"]
    assert t_tok.decode(resp, skip_special_tokens=True) == "The sky"


@needs_spacy
def test_shared_is_the_students_rendering_for_both_whatever_the_templates(tmp_path, pair):
    """The default reads no teacher template: the teacher tokenises the student's text, units at the same
    characters (as before the switch existed)."""
    s_tok, t_tok = pair
    default = list(describe_cross_examples(RECORDS, s_tok, t_tok, _data_cfg(tmp_path), SpanSettings()))
    for rec, ex in zip(RECORDS, default):
        assert "teacher_text" not in ex and "teacher_char_start" not in ex["units"][0]
        t_ids = t_tok(ex["text"], add_special_tokens=False)["input_ids"]
        for u in ex["units"]:
            assert t_tok.decode(t_ids[u["teacher_token_start"]:u["teacher_token_end"]]).strip() == u["text"]


def test_own_needs_cross_tokenizer_and_a_teacher_chat_template(tmp_path):
    base = {"teacher": {"path": "t"}, "student": {"path": "s"}, "data": {"train": "x", "teacher_template": "own"}}
    with pytest.raises(ConfigError, match="teacher_template: own.*objective.cross_tokenizer: true"):
        build_config(base)
    cfg = build_config({**base, "objective": {"base": "uld", "cross_tokenizer": True}})
    assert cfg.data.teacher_template == "own"
    assert build_config({**base, "data": {"train": "x"}}).data.teacher_template == "shared"
    with pytest.raises(ConfigError, match="teacher_template"):
        build_config({**base, "data": {"train": "x", "teacher_template": "mine"}})
    plain = build_other_tokenizer()  # no chat template
    with pytest.raises(DataError, match="teacher_template is 'own'.*no chat template"):
        build_cross_examples(RECORDS[:1], build_tokenizer(), plain,
                             DataConfig(train=["x"], template="raw", teacher_template="own"), progress=False)


def test_the_real_model_demo_config_is_valid():
    """configs/cross-tokenizer-demo.yaml (BENCHMARKS.md, "Different tokenizers"): validated without its models."""
    from mtakd.config import load_config
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "cross-tokenizer-demo.yaml")
    assert cfg.objective.cross_tokenizer and cfg.objective.base == "uld" and cfg.data.teacher_template == "own"
    assert cfg.objective.mta.hid_level == "unit" and cfg.data.template == "alpaca"


@needs_spacy
def test_distill_with_the_teachers_own_template_trains(tmp_path, tiny_teacher_dir, cross_student_dir):
    import json
    import math

    from mtakd.cli import main

    cfg = cross_run_config(tmp_path, tiny_teacher_dir, cross_student_dir, training={"save_steps": 10},
                           data={"teacher_template": "own"})  # student: alpaca
    assert main(["distill", "--config", str(cfg)]) == 0
    logs = [h for h in json.loads((tmp_path / "run" / "log_history.json").read_text()) if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h[k]) and h[k] > 0 for h in logs
                                  for k in ("loss_ce", "loss_kd", "loss_dsa", "loss_hid"))
    run = json.loads((tmp_path / "run" / "mtakd_run.json").read_text())
    assert run["data"]["teacher_template"] == "own"
