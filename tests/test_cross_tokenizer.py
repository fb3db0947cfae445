"""Cross-tokenizer distillation (issue 18): the ULD base against a slow reference, and the config's refusals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mtakd.config import ObjectiveConfig
from mtakd.objectives import OBJECTIVES

B = 3


def _labels(rows, t, vocab, seed):
    """rows: (prompt, response) lengths; right padding to t."""
    labels = torch.full((len(rows), t), -100, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    for b, (prompt, response) in enumerate(rows):
        labels[b, prompt:prompt + response] = torch.randint(0, vocab, (response,), generator=g)
    return labels


def _logits(t, v, seed):
    return torch.randn(B, t, v, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def ref_uld(s_logits, t_logits, s_labels, t_labels, temperature):
    """The paper's loss written per sequence and position: the i-th response token of each side, truncated to the
    shorter response; sorted probabilities, zero-padded to the larger vocabulary, L1; mean over aligned positions."""
    total, count = 0.0, 0
    for b in range(s_labels.shape[0]):
        s_pos = [t for t in range(s_labels.shape[1] - 1) if s_labels[b, t + 1] != -100]
        t_pos = [t for t in range(t_labels.shape[1] - 1) if t_labels[b, t + 1] != -100]
        for i in range(min(len(s_pos), len(t_pos))):
            p = sorted((s_logits[b, s_pos[i]] / temperature).softmax(-1).tolist(), reverse=True)
            q = sorted((t_logits[b, t_pos[i]] / temperature).softmax(-1).tolist(), reverse=True)
            n = max(len(p), len(q))
            p, q = p + [0.0] * (n - len(p)), q + [0.0] * (n - len(q))
            total += sum(abs(x - y) for x, y in zip(p, q))
            count += 1
    return total / count


def ref_ce(s_logits, labels):
    vals = [-s_logits[b, t].log_softmax(-1)[labels[b, t + 1]] for b in range(labels.shape[0])
            for t in range(labels.shape[1] - 1) if labels[b, t + 1] != -100]
    return sum(vals) / len(vals)


def test_uld_matches_slow_reference_across_vocabularies_and_lengths():
    s_labels = _labels([(2, 5), (3, 2), (1, 6)], 9, 13, 1)
    t_labels = _labels([(3, 4), (1, 7), (2, 6)], 11, 21, 2)  # other response lengths, positions and vocabulary
    s, t = _logits(9, 13, 3), _logits(11, 21, 4)
    cfg = ObjectiveConfig(base="uld", kd_ratio=0.3, temperature=1.5)
    out = OBJECTIVES["uld"](cfg)(SimpleNamespace(logits=s), SimpleNamespace(logits=t),
                                 {"labels": s_labels, "teacher_labels": t_labels})
    kd = ref_uld(s, t, s_labels, t_labels, 1.5)
    assert out["kd"].item() == pytest.approx(kd, rel=1e-10)
    assert out["loss"].item() == pytest.approx(0.7 * ref_ce(s, s_labels).item() + 0.3 * kd, rel=1e-10)


def test_uld_shared_labels_and_gradient():
    labels = _labels([(2, 5), (3, 2), (1, 6)], 9, 13, 1)
    s = _logits(9, 13, 3).requires_grad_()
    t = _logits(9, 17, 4)
    out = OBJECTIVES["uld"](ObjectiveConfig(base="uld", kd_ratio=1.0))(
        SimpleNamespace(logits=s), SimpleNamespace(logits=t), {"labels": labels})
    assert out["kd"].item() == pytest.approx(ref_uld(s.detach(), t, labels, labels, 1.0), rel=1e-10)
    out["loss"].backward()
    assert s.grad.abs().sum() > 0


def test_uld_is_zero_for_distributions_equal_up_to_a_permutation():
    labels = _labels([(2, 5), (3, 2), (1, 6)], 9, 13, 1)
    s = _logits(9, 13, 3)
    perm = torch.randperm(13, generator=torch.Generator().manual_seed(0))
    # the teacher: the same distributions over a permuted, larger vocabulary (extra tokens never predicted)
    t = torch.cat([s[..., perm], torch.full((B, 9, 6), float("-inf"), dtype=s.dtype)], -1)
    obj = OBJECTIVES["uld"](ObjectiveConfig(base="uld"))
    assert obj.kd_loss(s, t, labels, labels).item() == pytest.approx(0.0, abs=1e-12)
    assert obj.kd_loss(s, t.roll(1, dims=1), labels, labels).item() > 1e-3  # other positions: not zero


def test_bases_needing_a_shared_vocabulary_refuse_cross_tokenizer():
    with pytest.raises(ValueError, match=r"objective.base 'skl'.*cross_tokenizer.*allowed: sft, uld"):
        ObjectiveConfig(base="skl", cross_tokenizer=True)
    with pytest.raises(ValueError, match=r"hid_level 'token'.*unit is the default"):  # explicit token: refused
        ObjectiveConfig(base="uld", cross_tokenizer=True, mta={"hid_level": "token"})
    assert ObjectiveConfig(base="uld", cross_tokenizer=True, mta={"hid_level": "unit"}).cross_tokenizer


def test_cross_tokenizer_makes_unit_level_l_hid_the_default():
    """Before: the default hid_level (token) stopped a cross-tokenizer config with "set hid_level: unit"."""
    from mtakd.config import build_config

    assert ObjectiveConfig(base="uld", cross_tokenizer=True, mta={}).mta.hid_level == "unit"
    assert ObjectiveConfig(base="uld", mta={}).mta.hid_level == "token"  # one tokenizer: the spec's default
    cfg = build_config({"teacher": {"path": "t"}, "student": {"path": "s"}, "data": {"train": "d.jsonl"},
                        "objective": {"base": "uld", "cross_tokenizer": True, "mta": {"lambda_hid": 0.3}}})
    assert cfg.objective.mta.hid_level == "unit" and cfg.model_dump()["objective"]["mta"]["hid_level"] == "unit"


# ================================================================================ MTA over units
from mtakd.config import MTAConfig  # noqa: E402
from mtakd.mta import KeyLayer, MTALoss  # noqa: E402
from tests.test_mta_functional import ref_cos, ref_dsa, ref_importance, ref_pool  # noqa: E402
from tests.test_mta_loss import DS, DT, _setup  # noqa: E402

KEYS = [KeyLayer(1, 2, "word"), KeyLayer(2, 4, "phrase")]


def _teacher_tokenisation(seed=5):
    """The same units (4 words, 2 phrases per row, the same ones real as in _setup) over another tokenisation:
    13 positions, other token ranges, other padding."""
    _, _, s_mask, s_spans = _setup()
    g = torch.Generator().manual_seed(seed)
    tt = 13
    t_hidden = tuple(torch.randn(B, tt, DT, generator=g, dtype=torch.float64) for _ in range(7))
    mask = torch.ones(B, tt, dtype=torch.long)
    mask[1, 10:] = 0
    mask[2, 6:] = 0
    ranges = {"word": [(0, 2), (2, 3), (3, 5), (6, 9)], "phrase": [(0, 5), (6, 8)]}
    spans = {}
    for gran, rr in ranges.items():
        m = torch.zeros(B, len(rr), tt, dtype=torch.bool)
        for b in range(B):
            for k, (a, e) in enumerate(rr):
                if s_spans[f"{gran}_spans"][b, k].any():  # unit k is real in this row: real on both sides
                    m[b, k, a:e] = True
        spans[f"{gran}_spans"] = m
    return t_hidden, mask, spans


def _ref_cross(s_hidden, t_hidden, s_mask, t_mask, s_spans, t_spans, projectors, weights):
    """(L_DSA, L_Hid) written per unit: each side pools its own tokens with its own w, w^sp the teacher's
    (``student``: the student's), L_Hid = Σ_k w^sp_k (1 − cos(W U^S_k, U^T_k)), mean over rows."""
    dsa, hid = [], []
    uniform = weights == "uniform"
    for key, p in zip(KEYS, projectors):
        hs, ht = s_hidden[key.student].detach(), t_hidden[key.teacher]
        us, sw_s = ref_pool(hs, ref_importance(hs, s_mask, uniform=uniform), s_spans[f"{key.granularity}_spans"])
        ut, sw_t = ref_pool(ht, ref_importance(ht, t_mask, uniform=uniform), t_spans[f"{key.granularity}_spans"])
        sw = sw_s if weights == "student" else sw_t
        dsa.append(sum(ref_dsa(us, ut, sw, B)) / B)
        with torch.no_grad():
            hid.append(sum(float(sw[bk]) * (1 - ref_cos(p(us[bk]), ut[bk])) for bk in sw) / B)
    return sum(dsa) / len(dsa), sum(hid)


@pytest.mark.parametrize("weights", ["teacher", "student", "uniform"])
def test_cross_tokenizer_mta_matches_the_unit_reference(weights):
    s_hidden, _, s_mask, s_spans = _setup()
    t_hidden, t_mask, t_spans = _teacher_tokenisation()
    mta = MTALoss(MTAConfig(lambda_dsa=2.0, lambda_hid=0.2, hid_level="unit", weights=weights), KEYS)
    projectors = mta.build_projectors(DS, DT, from_teacher=False).double()
    got = mta(s_hidden, t_hidden, s_mask, s_spans, projectors, teacher_attention_mask=t_mask, teacher_spans=t_spans)
    dsa, hid = _ref_cross(s_hidden, t_hidden, s_mask, t_mask, s_spans, t_spans, projectors, weights)
    assert dsa > 1e-3 and hid > 1e-3
    assert got["dsa"].item() == pytest.approx(dsa, rel=1e-9)
    assert got["hid"].item() == pytest.approx(hid, rel=1e-9)


@pytest.mark.parametrize("weights,shared_weights", [("teacher", "student_pooling"), ("uniform", "uniform")])
def test_identical_tokenisations_give_the_shared_path_dsa(weights, shared_weights):
    """With the teacher tokenising exactly as the student, the cross-tokenizer path is the normal path (each
    side pooled with its own w, w^sp the teacher's: the shared path's ``student_pooling``)."""
    s_hidden, t_hidden, mask, spans = _setup()
    cross = MTALoss(MTAConfig(lambda_dsa=2.0, lambda_hid=0.2, hid_level="unit", weights=weights), KEYS)
    shared = MTALoss(MTAConfig(lambda_dsa=2.0, lambda_hid=0.2, hid_level="unit", weights=shared_weights), KEYS)
    projectors = cross.build_projectors(DS, DT, from_teacher=False).double()
    a = cross(s_hidden, t_hidden, mask, spans, projectors, teacher_attention_mask=mask, teacher_spans=spans)
    b = shared(s_hidden, t_hidden, mask, spans, projectors)
    assert a["dsa"].item() > 1e-3
    assert abs(a["dsa"].item() - b["dsa"].item()) <= 1e-6 * b["dsa"].item()
    assert abs(a["hid"].item() - b["hid"].item()) <= 1e-6 * b["hid"].item()


def test_unit_level_hid_with_one_tokenizer_equals_its_direct_computation():
    s_hidden, t_hidden, mask, spans = _setup()
    mta = MTALoss(MTAConfig(lambda_dsa=2.0, lambda_hid=0.2, hid_level="unit"), KEYS)
    projectors = mta.build_projectors(DS, DT, from_teacher=False).double()
    got = mta(s_hidden, t_hidden, mask, spans, projectors)
    token = MTALoss(MTAConfig(lambda_dsa=2.0, lambda_hid=0.2), KEYS)(s_hidden, t_hidden, mask, spans, projectors)
    hid = 0.0
    for key, p in zip(KEYS, projectors):  # default weights: the teacher's w pools both sides and gives w^sp
        hs, ht = s_hidden[key.student].detach(), t_hidden[key.teacher]
        w = ref_importance(ht, mask)
        us, _ = ref_pool(hs, w, spans[f"{key.granularity}_spans"])
        ut, sw = ref_pool(ht, w, spans[f"{key.granularity}_spans"])
        with torch.no_grad():
            hid += sum(float(sw[bk]) * (1 - ref_cos(p(us[bk]), ut[bk])) for bk in sw) / B
    assert got["hid"].item() == pytest.approx(hid, rel=1e-9)
    assert got["dsa"].item() == pytest.approx(token["dsa"].item(), rel=1e-12)  # L_DSA does not change
    assert abs(got["hid"].item() - token["hid"].item()) > 1e-6  # a different term than token-level L_Hid


# ================================================================================ two tokenisations
import json  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402

from tests.conftest import EXAMPLES, _CORPUS, build_tokenizer, needs_spacy, tiny_llama, write_tiny_run_config  # noqa: E402


def build_other_tokenizer(vocab_size: int = 300, whitespace: bool = False):
    """A second tokenizer unlike build_tokenizer's: Metaspace pre-tokenisation (spaces become ▁, no byte level),
    another vocabulary size and other special tokens; ``whitespace``: split on whitespace, which gets no token."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace() if whitespace else pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "</s>", "<pad>"],
                                  initial_alphabet=list(string.printable.strip()) + ["▁"], show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizers_pair():
    student, teacher = build_other_tokenizer(), build_tokenizer()
    assert student.get_vocab() != teacher.get_vocab() and len(student) != len(teacher)
    return student, teacher


def _data_cfg(tmp_path, **kw):
    from mtakd.config import DataConfig

    return DataConfig(train=[str(EXAMPLES / "demo.jsonl")], template="alpaca", max_prompt_length=200, max_length=400,
                      span_cache_dir=str(tmp_path / "spans"), **kw)


def _covering(offsets, a, b):
    """[first, last+1) of the tokens whose characters overlap [a, b)."""
    hit = np.flatnonzero((offsets[:, 0] < b) & (offsets[:, 1] > a) & (offsets[:, 1] > offsets[:, 0]))
    return (int(hit[0]), int(hit[-1]) + 1) if hit.size else None


@needs_spacy
def test_units_map_to_the_same_characters_in_both_tokenisations(tmp_path, tokenizers_pair):
    from mtakd.data import SpanSettings, describe_cross_examples, load_records

    s_tok, t_tok = tokenizers_pair
    records = load_records(str(EXAMPLES / "demo.jsonl"))[:4]
    shown = list(describe_cross_examples(records, s_tok, t_tok, _data_cfg(tmp_path), SpanSettings()))
    differ = 0
    for ex in shown:
        offs = {side: np.asarray(tok(ex["text"], return_offsets_mapping=True)["offset_mapping"]).reshape(-1, 2)
                for side, tok in (("", s_tok), ("teacher_", t_tok))}
        assert len(ex["units"]) > 10
        for u in ex["units"]:
            assert u["text"] == ex["text"][u["char_start"]:u["char_end"]]
            for side, o in offs.items():  # each side's range: exactly the tokens holding the unit's characters
                start, end = u[f"{side}token_start"], u[f"{side}token_end"]
                assert end > start
                assert (start, end) == _covering(o, u["char_start"], u["char_end"]), (side, u)
            differ += (u["token_start"], u["token_end"]) != (u["teacher_token_start"], u["teacher_token_end"])
    assert differ > 10  # the two tokenisations really differ


@needs_spacy
def test_cross_examples_and_collator_carry_both_tokenisations(tmp_path, tokenizers_pair):
    from mtakd.data import CrossCollator, DataStats, SpanSettings, build_cross_examples, load_records

    s_tok, t_tok = tokenizers_pair
    records = load_records(str(EXAMPLES / "demo.jsonl"))[:3]
    stats = DataStats()
    examples = build_cross_examples(records, s_tok, t_tok, _data_cfg(tmp_path), spans=SpanSettings(), stats=stats,
                                    progress=False)
    for rec, ex in zip(records, examples):
        # one text: the response decodes the same from both tokenisations' labels
        for ids, labels, tok in ((ex.input_ids, ex.labels, s_tok), (ex.teacher_input_ids, ex.teacher_labels, t_tok)):
            resp = [i for i, l in zip(ids, labels) if l != -100]
            assert tok.decode(resp, skip_special_tokens=True).strip() == rec.output.strip()
        for g in ("word", "phrase"):
            assert len(ex.spans[g]) == len(ex.teacher_spans[g]) > 0
    batch = CrossCollator(s_tok.pad_token_id, t_tok.pad_token_id)(examples)
    assert batch["teacher_input_ids"].shape == batch["teacher_attention_mask"].shape == batch["teacher_labels"].shape
    for g in ("word", "phrase"):
        s, t = batch[f"{g}_spans"], batch[f"teacher_{g}_spans"]
        assert s.shape[:2] == t.shape[:2] and t.shape[-1] == batch["teacher_input_ids"].shape[-1]
        assert torch.equal(s.any(-1), t.any(-1))  # the same units are real on both sides
    assert (batch["teacher_input_ids"][batch["teacher_attention_mask"] == 0] == t_tok.pad_token_id).all()


def test_units_one_tokenizer_cannot_represent_are_dropped_and_counted(tokenizers_pair):
    from mtakd.data import DataStats, Record, Units, _cross_tokenize
    from mtakd.config import DataConfig

    s_tok, t_tok = build_other_tokenizer(whitespace=True), tokenizers_pair[1]
    rec = Record("Say hi.", "", "The  sky", "x")
    cfg = DataConfig(train=["x"], template="raw", max_prompt_length=20, max_length=40)
    text = "Say hi.\nThe  sky"
    # unit 1: a space, which whitespace pre-tokenisation gives no token but byte-level BPE does
    chars = np.asarray([[12, 15], [text.index("  ") + 1, text.index("  ") + 2], [0, 3]])
    units = Units(chars, np.asarray(["word", "word", "word"]), np.asarray(["response", "response", "instruction"]))
    stats = DataStats()
    ex, got_text, tok_s, tok_t, kept, _, _ = _cross_tokenize(rec, s_tok, t_tok, cfg, units, "drop", stats)
    assert got_text == text
    assert kept.tolist() == [True, False, True] and stats.units_cross_dropped == 1
    assert len(ex.spans["word"]) == len(ex.teacher_spans["word"]) == 2


# ================================================================================== end to end
@pytest.fixture(scope="module")
def cross_student_dir(tmp_path_factory):
    """A tiny random student with build_other_tokenizer's vocabulary (the teacher: tiny_teacher_dir's)."""
    s_tok = build_other_tokenizer()
    d = tmp_path_factory.mktemp("cross_student")
    tiny_llama(len(s_tok), layers=2, hidden=16, seed=1).save_pretrained(d)
    s_tok.save_pretrained(d)
    return d


def cross_run_config(tmp_path, teacher_dir, student_dir, *, training: dict, data: dict | None = None):
    """A two-step uld + MTA run across two tokenizers, prompts untruncated (the tokenisations' lengths differ)."""
    mta = {"hid_level": "unit", "key_layers": [{"student": 1, "teacher": 2, "granularity": "word"},
                                               {"student": 2, "teacher": 4, "granularity": "phrase"}]}
    return write_tiny_run_config(
        tmp_path / "run.yaml", teacher_dir, student_dir, EXAMPLES / "demo.jsonl", tmp_path / "run", tmp_path / "spans",
        objective={"base": "uld", "cross_tokenizer": True, "mta": mta},
        training={"max_steps": 2, "report_to": "none", **training},
        data={"max_prompt_length": 200, "max_length": 400, **(data or {})})


@needs_spacy
def test_cross_tokenizer_distill_with_uld_and_mta_trains_and_resumes(tmp_path, tiny_teacher_dir, cross_student_dir):
    from transformers import AutoTokenizer

    from mtakd.cli import main

    cfg = cross_run_config(tmp_path, tiny_teacher_dir, cross_student_dir, training={"save_steps": 1})
    assert main(["distill", "--config", str(cfg)]) == 0
    logs = [h for h in json.loads((tmp_path / "run" / "log_history.json").read_text()) if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        for k in ("loss_ce", "loss_kd", "loss_dsa", "loss_hid"):
            assert math.isfinite(h[k]) and h[k] > 0, (k, h)
    # the student keeps its own tokenizer
    saved = AutoTokenizer.from_pretrained(tmp_path / "run" / "student")
    assert saved.get_vocab() == AutoTokenizer.from_pretrained(cross_student_dir).get_vocab()
    stats = json.loads((tmp_path / "run" / "mtakd_run.json").read_text())["data_stats"]
    assert "units_cross_dropped" in stats
    # resume from step 1 and train on to step 3
    assert main(["distill", "--config", str(cfg), "--resume", str(tmp_path / "run" / "checkpoint-1"),
                 "training.max_steps=3"]) == 0
    logs = [h for h in json.loads((tmp_path / "run" / "log_history.json").read_text()) if "loss" in h]
    assert [h["step"] for h in logs][-2:] == [2, 3]


def test_cross_tokenizer_refuses_other_bases_and_a_teacher_cache(tmp_path, tiny_teacher_dir, cross_student_dir):
    from mtakd.config import ConfigError, load_config
    from mtakd.distill import distill

    cfg = write_tiny_run_config(tmp_path / "run.yaml", tiny_teacher_dir, cross_student_dir, EXAMPLES / "demo.jsonl",
                                tmp_path / "run", tmp_path / "spans", objective={"base": "skl"})
    with pytest.raises(ConfigError, match="objective.base 'skl'.*cross_tokenizer"):
        load_config(cfg, ["objective.cross_tokenizer=true"])
    with pytest.raises(Exception, match="must share a tokenizer"):  # without the switch: stops as before
        distill(load_config(cfg, ["objective.mta=null"]))
    with pytest.raises(ConfigError, match="teacher.cache.*cross_tokenizer"):
        distill(load_config(cfg, ["objective.base=uld", "objective.cross_tokenizer=true", "objective.mta=null",
                                  f"teacher.cache={tmp_path}"]))


@needs_spacy
def test_spans_show_gives_both_token_ranges(tmp_path, tiny_teacher_dir, cross_student_dir, capsys):
    from mtakd import spans_cli
    from tests.conftest import run_subcommand

    cfg = write_tiny_run_config(tmp_path / "run.yaml", tiny_teacher_dir, cross_student_dir, EXAMPLES / "demo.jsonl",
                                tmp_path / "run", tmp_path / "spans",
                                objective={"base": "uld", "cross_tokenizer": True, "mta": {"hid_level": "unit"}})
    assert run_subcommand(spans_cli, ["spans", "--config", str(cfg), "--show", "1", "--json"]) == 0
    ex = json.loads(capsys.readouterr().out.splitlines()[0])
    units = ex["units"]
    assert units and all(u["token_end"] > u["token_start"] and u["teacher_token_end"] > u["teacher_token_start"]
                         for u in units)
    assert any((u["token_start"], u["token_end"]) != (u["teacher_token_start"], u["teacher_token_end"]) for u in units)


@needs_spacy
def test_identical_tokenizers_give_the_normal_examples_on_both_sides(tmp_path, tiny_tokenizer):
    from mtakd.data import SpanSettings, build_cross_examples, build_examples, load_records

    records = load_records(str(EXAMPLES / "demo.jsonl"))[:3]
    cfg = _data_cfg(tmp_path).model_copy(update={"max_prompt_length": 20, "max_length": 40})  # truncated: dropped units agree too
    normal = build_examples(records, tiny_tokenizer, cfg, spans=SpanSettings(), progress=False)
    cross = build_cross_examples(records, tiny_tokenizer, tiny_tokenizer, cfg, spans=SpanSettings(), progress=False)
    for a, b in zip(normal, cross):
        assert a.input_ids == b.input_ids == b.teacher_input_ids and a.labels == b.labels == b.teacher_labels
        for g in ("word", "phrase"):
            assert np.array_equal(a.spans[g], b.spans[g]) and np.array_equal(a.spans[g], b.teacher_spans[g])
