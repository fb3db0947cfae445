"""Padded vocabularies: teacher and student share one tokenizer (one token-to-id map) but their LM heads have different
numbers of output rows (Qwen2.5-7B: 152,064 rows, 1.5B: 151,936, for 151,665 token ids). The KD terms, the teacher
cache and the teacher-forced KL compare the two distributions on the tokenizer's ids only; padded rows are ignored.
A different token-to-id map is still refused, with one message (mtakd.models.shared_vocabulary)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from mtakd.cli import main
from tests.conftest import EXAMPLES, build_tokenizer, tiny_llama, write_tiny_run_config

PAD_T, PAD_S = 8, 3  # padded rows past the tokenizer's ids: teacher, student


# ------------------------------------------------------------------------------------ the check
def test_shared_vocabulary_returns_the_tokenizers_ids_and_refuses_another_map(tiny_tokenizer):
    from mtakd.models import ModelError, shared_vocabulary, vocabulary_ids

    v = len(tiny_tokenizer)
    assert vocabulary_ids(tiny_tokenizer) == v
    teacher, student = tiny_llama(v + PAD_T, layers=1), tiny_llama(v + PAD_S, layers=1)
    assert shared_vocabulary(tiny_tokenizer, tiny_tokenizer) == v
    assert shared_vocabulary(tiny_tokenizer, tiny_tokenizer, teacher, student) == v
    assert shared_vocabulary(tiny_tokenizer, tiny_tokenizer, teacher, tiny_llama(v - 2, layers=1)) == v - 2
    other = build_tokenizer(vocab_size=350)
    for models in ((teacher, student), (None, None)):
        with pytest.raises(ModelError, match="must share a tokenizer .*token-to-id maps differ.*cross_tokenizer"):
            shared_vocabulary(tiny_tokenizer, other, *models)


# ------------------------------------------------------------------------------------ the losses
def _logits(v, seed, b=2, t=6, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, v, generator=g, dtype=torch.float64) * scale


LABELS = torch.tensor([[-100, -100, 5, 6, 7, 1], [-100, 3, 4, 9, -100, -100]])
N_IDS = 30


@pytest.mark.parametrize("base", ["fkl", "rkl", "skl", "srkl", "js", "gjsd", "tvd", "akl", "distillm"])
@pytest.mark.parametrize("chunk_size", [0, 2])
def test_kd_terms_equal_those_on_logits_cut_to_the_tokenizers_ids(base, chunk_size):
    """Student and teacher heads with padded rows (different numbers): L_base equals CE over the student's rows plus
    KD over logits cut to the tokenizer's ids, computed by the same objective on heads without padding."""
    from mtakd.config import ObjectiveConfig
    from mtakd.objectives import build_objective

    cfg = ObjectiveConfig(base=base, kd_ratio=0.5, chunk_size=chunk_size, temperature=2.0)
    padded, plain = build_objective(cfg), build_objective(cfg)
    padded.set_vocabulary(N_IDS)
    s, t = _logits(N_IDS + PAD_S, 0), _logits(N_IDS + PAD_T, 1)
    t[..., N_IDS:] += 3.0  # padded teacher rows with real mass: comparing them would change the loss
    loss, ce, kd = padded.base_loss(s, t, LABELS)
    _, ce_ref, kd_ref = plain.base_loss(s[..., :N_IDS], t[..., :N_IDS], LABELS)
    mask = LABELS[:, 1:].ne(-100)
    torch.testing.assert_close(ce, F.cross_entropy(s[:, :-1][mask], LABELS[:, 1:][mask]))  # all student rows
    torch.testing.assert_close(kd, kd_ref)
    torch.testing.assert_close(loss, 0.5 * ce + 0.5 * kd)
    assert not torch.allclose(ce, ce_ref)  # the CE does see the student's padded rows


def test_forward_kl_on_padded_heads_by_hand():
    """The obviously-correct reference: per position, Σ_{v < ids} p_T(v)·log(p_T(v)/p_S(v)) with both distributions
    renormalised on the tokenizer's ids, averaged over the response positions."""
    from mtakd.config import ObjectiveConfig
    from mtakd.objectives import build_objective

    obj = build_objective(ObjectiveConfig(base="fkl"))
    obj.set_vocabulary(N_IDS)
    s, t = _logits(N_IDS + PAD_S, 2), _logits(N_IDS + PAD_T, 3)
    total, n = 0.0, 0
    for b in range(LABELS.shape[0]):
        for pos in range(LABELS.shape[1] - 1):
            if LABELS[b, pos + 1] == -100:
                continue
            p = s[b, pos, :N_IDS].exp() / s[b, pos, :N_IDS].exp().sum()
            q = t[b, pos, :N_IDS].exp() / t[b, pos, :N_IDS].exp().sum()
            total += float((q * (q / p).log()).sum())
            n += 1
    assert float(obj.kd_loss(s, t, LABELS)) == pytest.approx(total / n, rel=1e-10)


def test_a_topk_and_a_full_cache_on_a_padded_student():
    """Cached teacher log-probabilities over the tokenizer's ids (as cache-teacher writes them) against a student with
    padded rows: the loss is the one on the student's logits cut to those ids."""
    from mtakd.config import ObjectiveConfig
    from mtakd.objectives import build_objective
    from mtakd.objectives.base import CachedLogProbs

    obj, plain = build_objective(ObjectiveConfig(base="rkl")), build_objective(ObjectiveConfig(base="rkl"))
    obj.set_vocabulary(N_IDS)
    s, t = _logits(N_IDS + PAD_S, 4), _logits(N_IDS, 5)
    mask = LABELS[:, 1:].ne(-100)
    t_logp = torch.log_softmax(t[:, :-1][mask], -1)
    for cached in (CachedLogProbs(t_logp, None), CachedLogProbs.top_k(t_logp, 6)):
        torch.testing.assert_close(obj.kd_loss(s, cached, LABELS), plain.kd_loss(s[..., :N_IDS], cached, LABELS))


def test_distillm2_and_fdd_cut_to_the_tokenizers_ids():
    from mtakd.objectives.distillm2 import distillm2_chunked, distillm2_divergences
    from mtakd.objectives.fdd import fdd_terms
    from mtakd.objectives.gjsd import kl

    s, t = _logits(N_IDS + PAD_S, 6, b=4), _logits(N_IDS + PAD_T, 7, b=4)
    labels = torch.cat([LABELS, LABELS])
    kw = dict(teacher_alpha=0.1, student_alpha=0.1, temperature=1.0, detach_mixture=True)
    got = distillm2_divergences(s, t, labels, 2, vocab=N_IDS, **kw)
    want = distillm2_divergences(s[..., :N_IDS], t[..., :N_IDS], labels, 2, **kw)
    torch.testing.assert_close(torch.stack(got), torch.stack(want))
    ck = dict(kw, beta=0.5, kd_ratio=1.0, chunk_size=3)
    torch.testing.assert_close(torch.stack(distillm2_chunked(s, t, labels, 2, vocab=N_IDS, **ck)[2:]),
                               torch.stack(distillm2_chunked(s[..., :N_IDS], t[..., :N_IDS], labels, 2, **ck)[2:]))
    pts_s, pts_t = [s[0], s[1]], [t[0], t[1]]
    ident = [lambda x: x] * 2
    got = fdd_terms(pts_s, pts_t, ident, ident, lambda a, b: kl(b, a), vocab=N_IDS)
    want = fdd_terms([x[..., :N_IDS] for x in pts_s], [x[..., :N_IDS] for x in pts_t], ident, ident,
                     lambda a, b: kl(b, a))
    torch.testing.assert_close(torch.stack(got[0] + got[1]), torch.stack(want[0] + want[1]))


# --------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def padded_pair(tmp_path_factory, tiny_tokenizer):
    """(teacher dir, student dir): one tokenizer, teacher heads with PAD_T padded rows, student with PAD_S."""
    root = tmp_path_factory.mktemp("padded")
    v = len(tiny_tokenizer)
    dirs = []
    for name, rows, layers, hidden in (("teacher", v + PAD_T, 4, 32), ("student", v + PAD_S, 2, 16)):
        tiny_llama(rows, layers=layers, hidden=hidden, seed=len(name)).save_pretrained(root / name)
        tiny_tokenizer.save_pretrained(root / name)
        dirs.append(root / name)
    return root, *dirs


def _config(root, teacher, student, name, **objective):
    return write_tiny_run_config(
        root / f"{name}.yaml", teacher, student, EXAMPLES / "demo.jsonl", root / name, root / "spans",
        data={"max_samples": 8}, objective={"base": "fkl", "mta": None, **objective}, training={"max_steps": 2})


def _losses(run):
    return [h for h in json.loads((run / "log_history.json").read_text()) if "loss" in h]


def test_distill_and_the_teacher_cache_with_padded_heads(padded_pair, caplog):
    """Training runs (it was refused with "must share a tokenizer"), says once that padded rows are ignored, and a
    float32 full-vocabulary cache and a top-k cache (log-probabilities over the tokenizer's ids) train from the cache;
    the full cache reproduces the online losses."""
    root, teacher, student = padded_pair
    caplog.set_level(logging.INFO, logger="mtakd.models")
    cfg = _config(root, teacher, student, "online")
    assert main(["distill", "--config", str(cfg)]) == 0
    notes = [r.getMessage() for r in caplog.records if "padded rows ignored" in r.getMessage()]
    assert len(notes) == 1 and "first 400 rows" in notes[0], notes
    online = _losses(root / "online")
    assert [h["step"] for h in online] == [1, 2]
    for top_k in (0, 4):
        cache = root / f"cache{top_k}"
        assert main(["cache-teacher", "--config", str(cfg), "--out", str(cache), "--top-k", str(top_k),
                     "--dtype", "float32"]) == 0
        manifest = json.loads((cache / "manifest.json").read_text())
        assert manifest["teacher"]["vocab"] == 400 and manifest["teacher"]["vocab_rows"] == 400 + PAD_T
        run = root / f"cached{top_k}"
        assert main(["distill", "--config", str(cfg), f"teacher.cache={cache}", f"training.output_dir={run}"]) == 0
        cached = _losses(run)
        assert [h["step"] for h in cached] == [1, 2]
        if top_k == 0:
            for x, y in zip(online, cached):
                for k in ("loss", "loss_ce", "loss_kd"):
                    assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), (k, x["step"])


def test_a_different_token_to_id_map_points_to_cross_tokenizer_mode(tmp_path, padded_pair, capsys):
    root, teacher, _ = padded_pair
    other = build_tokenizer(vocab_size=350)
    student = tmp_path / "other"
    tiny_llama(len(other), layers=2, hidden=16).save_pretrained(student)
    other.save_pretrained(student)
    assert main(["distill", "--config", str(_config(tmp_path, teacher, student, "refused"))]) == 2
    err = capsys.readouterr().err
    assert "must share a tokenizer" in err and "token-to-id maps differ" in err and "cross_tokenizer: true" in err


def test_evaluate_kl_between_padded_heads(padded_pair, tiny_tokenizer, tmp_path):
    """KL(teacher ‖ model) on the tokenizer's ids, against a token-by-token reference on the cut logits; and through
    the CLI (which stopped with the output rows' mismatch)."""
    from mtakd import evaluate
    from mtakd.data import DataStats, Record, tokenize
    from transformers import AutoModelForCausalLM

    root, teacher_dir, student_dir = padded_pair
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    model = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    tok = tiny_tokenizer
    records = [Record("Explain why the sky is blue.", "", out, f"m:{i}")
               for i, out in enumerate(["The sea and the sky.", "Water boils."])]
    got = evaluate.teacher_forced(model, tok, records, template="alpaca", teacher=teacher, batch_size=2)
    v = len(tok)
    for i, rec in enumerate(records):
        e = tokenize(rec, tok, template="alpaca", system_prompt=None, max_prompt_length=256, max_length=512,
                     stats=DataStats())
        n_prompt, kls = e.labels.count(-100), []
        with torch.inference_mode():
            for j in range(n_prompt, len(e.input_ids)):
                ids = torch.tensor([e.input_ids[:j]])
                p = torch.softmax(teacher(ids).logits[0, -1, :v].double(), -1)
                q = torch.softmax(model(ids).logits[0, -1, :v].double(), -1)
                kls.append(float((p * (p.log() - q.log())).sum()))
        assert got["kl"][i] == pytest.approx(sum(kls) / len(kls), rel=1e-3)
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps({"instruction": r.instruction, "output": r.output}) + "\n" for r in records))
    assert main(["evaluate", "--model", str(student_dir), "--teacher", str(teacher_dir), "--data", str(data),
                 "--out", str(tmp_path / "eval"), "--metrics", "nll", "kl", "--template", "alpaca"]) == 0
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["per_prompt"]["set"]["kl"] == pytest.approx(got["kl"], rel=1e-5)


# ------------------------------------------------------------------------------------ generation
def _dominant_padding(v: int, hidden: int = 32):
    """A tiny model whose padded rows (±1000·e_k, past the tokenizer's ``v`` ids) hold the largest logit at every
    position: a decoder that does not leave them out would choose them at once."""
    model = tiny_llama(v + 2 * hidden, layers=1, hidden=hidden)
    with torch.no_grad():
        eye = torch.eye(hidden) * 1000.0
        model.lm_head.weight[v:] = torch.cat([eye, -eye])
    return model


def test_generation_never_chooses_a_padded_row(tiny_tokenizer):
    """`mtakd evaluate` / `generate` (greedy and sampled) and DistiLLM's student outputs only produce the tokenizer's
    ids; without the cut, the same decoder picks padded rows."""
    from mtakd.config import DataConfig, ObjectiveConfig
    from mtakd.decoding import _left_pad, decode_batch, generation_config
    from mtakd.objectives import build_objective

    v = len(tiny_tokenizer)
    model = _dominant_padding(v)
    prompts = [tiny_tokenizer("the cat sat")["input_ids"], tiny_tokenizer("a dog")["input_ids"]]
    for greedy in (True, False):
        cfg = generation_config(model, tiny_tokenizer, greedy=greedy, max_new_tokens=5)
        inputs = _left_pad(prompts, cfg.pad_token_id, "cpu")
        torch.manual_seed(0)
        assert all(t >= v for row in decode_batch(model, inputs, cfg) for t in row)  # the failure this test guards
        torch.manual_seed(0)
        rows = decode_batch(model, inputs, cfg, vocab=v)
        assert rows and all(0 <= t < v for row in rows for t in row)
    distillm = build_objective(ObjectiveConfig(base="distillm", options={"max_new_tokens": 5}))
    distillm.tokenizer, distillm.data_cfg = tiny_tokenizer, DataConfig(train=["x.jsonl"])
    torch.manual_seed(0)
    out = distillm.sample_responses(model, prompts)
    assert all(0 <= t < v for tokens, _ in out for t in tokens) and any(tokens for tokens, _ in out)
