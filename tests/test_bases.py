"""The paper's base objectives (DistiLLM, DistiLLM-2, FDD): losses against references written the obvious
way (float64), their data/state machinery, `mtakd generate`, and 2 training steps of each base with MTA
on tiny random GPT-2, Qwen2 and OPT pairs (LoRA on the OPT student)."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mtakd.config import ConfigError, ObjectiveConfig, build_config
from mtakd.objectives import OBJECTIVES, build_objective
from mtakd.objectives.distillm import DistiLLM, membership_to_ranges, sgo_decision
from mtakd.objectives.distillm2 import PairCollator, PairExample, distillm2_divergences
from mtakd.objectives.fdd import FDDOptions, fdd_terms, logit_lens, trajectory
from tests.conftest import EXAMPLES, REPO, build_tokenizer, needs_spacy

B, T, V = 3, 9, 13


def _labels(rows, seed=1) -> torch.Tensor:
    """rows: (prompt, response) lengths; right padding to T."""
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    for b, (prompt, response) in enumerate(rows):
        labels[b, prompt:prompt + response] = torch.randint(0, V, (response,), generator=g)
    return labels


def _logits(n, seed, scale=2.0):
    return torch.randn(n, T, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def ref_kl(p, q):
    return (p * (p.log() - q.log())).sum(-1)


def ref_ce(s_logits, labels):
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(T - 1):
            if labels[b, t + 1] != -100:
                total = total - s_logits[b, t].log_softmax(-1)[labels[b, t + 1]]
                count += 1
    return total / max(count, 1)


# ====================================================================================== DistiLLM
@pytest.mark.parametrize("div", ["skl", "srkl"])
def test_distillm_loss_matches_reference(div):
    labels = _labels([(2, 5), (3, 2), (1, 6)])
    s, t = _logits(B, 1), _logits(B, 2)
    cfg = ObjectiveConfig(base="distillm", kd_ratio=0.3, skew_alpha=0.2, options={"divergence": div})
    out = OBJECTIVES["distillm"](cfg)(SimpleNamespace(logits=s), SimpleNamespace(logits=t), {"labels": labels})
    vals = []
    for b in range(B):
        for pos in range(T - 1):
            if labels[b, pos + 1] == -100:
                continue
            p, q = t[b, pos].softmax(-1), s[b, pos].softmax(-1)
            vals.append(ref_kl(p, 0.2 * p + 0.8 * q) if div == "skl" else ref_kl(q, 0.2 * q + 0.8 * p))
    kd = torch.stack(vals).mean()
    ce = ref_ce(s, labels)
    assert out["kd"].item() == pytest.approx(kd.item(), rel=1e-10)
    assert out["loss"].item() == pytest.approx((0.7 * ce + 0.3 * kd).item(), rel=1e-10)


def test_sgo_decision_follows_the_official_rule():
    # decreasing: sample threshold θ(1 − progress); below θ with a non-full buffer → generate; else replay
    assert sgo_decision(0.05, 0.0, 0.0, 0, 10, "decreasing") == "data"
    assert sgo_decision(0.3, 0.5, 0.5, 100, 10, "decreasing") == "replay"  # 0.25 ≤ u < 0.5, buffer full
    assert sgo_decision(0.2, 0.5, 0.5, 100, 10, "decreasing") == "generate"  # u < 0.25
    assert sgo_decision(0.3, 0.5, 0.5, 3, 10, "decreasing") == "generate"  # buffer not full yet
    assert sgo_decision(0.6, 0.5, 0.5, 3, 10, "decreasing") == "data"
    assert sgo_decision(0.3, 0.5, 0.9, 100, 10, "constant") == "replay"  # θ/2 = 0.25
    assert sgo_decision(0.2, 0.5, 0.9, 100, 10, "constant") == "generate"
    assert sgo_decision(0.2, 0.5, 0.2, 100, 10, "increasing") == "replay"  # θ·progress = 0.1


def test_threshold_adapts_to_validation_loss():
    obj = DistiLLM(ObjectiveConfig(base="distillm", options={"init_threshold": 0.0, "loss_eps": 0.1}))
    obj.update_threshold(2.0)  # first evaluation: reference only
    assert (obj.threshold, obj.prev_loss) == (0.0, 2.0)
    obj.update_threshold(2.05)  # rose by less than eps
    assert (obj.threshold, obj.prev_loss) == (0.0, 2.0)
    obj.update_threshold(2.1)
    assert obj.threshold == pytest.approx(0.1) and obj.prev_loss == 2.1
    for _ in range(20):
        obj.update_threshold(obj.prev_loss + 1)
    assert obj.threshold == 1.0


def test_callback_reads_the_validation_ce_and_plain_skew_kd_has_no_sgo():
    from transformers import TrainerCallback

    obj = DistiLLM(ObjectiveConfig(base="distillm"))
    (callback,) = obj.callbacks()
    assert isinstance(callback, TrainerCallback)
    callback.on_evaluate(None, None, None, metrics={"eval_loss": 9.0, "eval_loss_ce": 3.0})
    assert obj.prev_loss == 3.0
    plain = DistiLLM(ObjectiveConfig(base="distillm", options={"student_generation": False}))
    assert plain.callbacks() == []
    model = torch.nn.Linear(1, 1)
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long)}
    assert plain.prepare_inputs(None, model, batch) is batch


def test_validation_held_out_of_train():
    from mtakd.run import _hold_out

    train, val = _hold_out(list(range(20)), 5)
    assert len(val) == 5 and sorted(train + val) == list(range(20)) and _hold_out(list(range(20)), 5) == (train, val)
    with pytest.raises(ConfigError, match="smaller than"):
        _hold_out([1, 2], 2)
    with pytest.raises(ConfigError, match="not both"):
        build_config({"teacher": {"path": "t"}, "student": {"path": "s"},
                      "data": {"train": ["x"], "validation": ["y"], "validation_size": 3}})


def test_membership_to_ranges():
    m = torch.zeros(2, 3, 8, dtype=torch.bool)
    m[0, 0, 1:3] = True
    m[0, 2, 5:8] = True
    m[1, 1, 0:1] = True
    got = membership_to_ranges(m)
    assert got[0].tolist() == [[1, 3], [5, 8]] and got[1].tolist() == [[0, 1]]


def test_distillm_state_roundtrip(tmp_path):
    from mtakd.data import Example

    obj = DistiLLM(ObjectiveConfig(base="distillm", options={"capacity": 3}))
    obj.rng = random.Random(5)
    for i in range(4):
        obj.buffer.append(Example([1, 2, 3 + i], [-100, 2, 3 + i], {"word": np.array([[1, 2]]), "phrase": np.zeros((0, 2))}))
    obj.threshold, obj.prev_loss = 0.3, 1.5
    obj.rng.random()
    obj.save_state(str(tmp_path), rank=1)
    assert (tmp_path / "distillm_state-rank1.json").is_file()
    expected = [obj.rng.random() for _ in range(3)]
    other = DistiLLM(ObjectiveConfig(base="distillm", options={"capacity": 3}))
    assert other.load_state(str(tmp_path), rank=1)
    assert (other.threshold, other.prev_loss, len(other.buffer)) == (0.3, 1.5, 3)  # FIFO kept the last 3
    assert [e.input_ids[-1] for e in other.buffer] == [4, 5, 6]
    assert other.buffer[0].spans["word"].tolist() == [[1, 2]] and other.buffer[0].spans["phrase"].shape == (0, 2)
    assert [other.rng.random() for _ in range(3)] == expected
    assert not other.load_state(str(tmp_path), rank=0)


# ==================================================================================== DistiLLM-2
def _pair_batch():
    # rows 0..2: teacher-response sequences, rows 3..5: student-response ones (one with no response token)
    labels = _labels([(2, 5), (3, 2), (1, 6), (2, 4), (4, 3), (3, 0)], seed=3)
    return labels, _logits(6, 4), _logits(6, 5)


def ref_distillm2(s, t, labels, a1, a2, detach):
    n = labels.shape[0] // 2
    skl, srkl = [], []
    for b in range(labels.shape[0]):
        vals = []
        for pos in range(T - 1):
            if labels[b, pos + 1] == -100:
                continue
            p, q = t[b, pos].softmax(-1), s[b, pos].softmax(-1)
            if b < n:
                vals.append(ref_kl(p, a1 * p + (1 - a1) * q))
            else:
                qm = q.detach() if detach else q
                vals.append((q * (q.log() - (a2 * qm + (1 - a2) * p).log())).sum())
        if vals:
            (skl if b < n else srkl).append(torch.stack(vals).mean())
    return torch.stack(skl).mean(), torch.stack(srkl).mean()


@pytest.mark.parametrize("detach", [True, False])
def test_distillm2_divergences_and_gradients_match_reference(detach):
    labels, s, t = _pair_batch()
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    skl, srkl = distillm2_divergences(s1, t, labels, 3, teacher_alpha=0.1, student_alpha=0.3, detach_mixture=detach)
    r_skl, r_srkl = ref_distillm2(s2, t, labels, 0.1, 0.3, detach)
    assert skl.item() == pytest.approx(r_skl.item(), rel=1e-10)
    assert srkl.item() == pytest.approx(r_srkl.item(), rel=1e-10)
    (skl + 2 * srkl).backward()
    (r_skl + 2 * r_srkl).backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-9, atol=1e-12)


def test_distillm2_objective_combines_with_beta_and_ce():
    labels, s, t = _pair_batch()
    cfg = ObjectiveConfig(base="distillm2", kd_ratio=0.6, skew_alpha=0.2,
                          options={"beta_schedule": "gradual", "student_alpha": 0.3})
    obj = OBJECTIVES["distillm2"](cfg)
    obj.progress = 0.2  # β = 1 + 0.5·min(1, 0.4)
    out = obj(SimpleNamespace(logits=s), SimpleNamespace(logits=t), {"labels": labels})
    r_skl, r_srkl = ref_distillm2(s, t, labels, 0.2, 0.3, True)
    beta = 1.2
    kd = (2 - beta) * r_skl + beta * r_srkl
    ce = ref_ce(s[:3], labels[:3])  # CE on the teacher responses only
    assert out["kd"].item() == pytest.approx(kd.item(), rel=1e-10)
    assert out["loss"].item() == pytest.approx((0.4 * ce + 0.6 * kd).item(), rel=1e-10)
    obj.progress = 0.9
    assert obj.beta() == pytest.approx(1.5)


def test_pair_collator_puts_teacher_rows_first_with_spans():
    from mtakd.data import Example

    def ex(n, spans):
        return Example(list(range(1, n + 1)), [-100, -100] + list(range(3, n + 1)), spans)

    pairs = [PairExample(ex(5, {"word": np.array([[0, 2]])}), ex(11, {})),
             PairExample(ex(7, {"word": np.array([[1, 3], [4, 6]])}), ex(3, {}))]
    batch = PairCollator(0)(pairs)
    assert batch["input_ids"].shape == (4, 16) and batch["mta_rows"] == 2
    assert batch["attention_mask"].sum(1).tolist() == [5, 7, 11, 3]
    assert batch["word_spans"].shape == (2, 2, 16)
    assert batch["word_spans"][1, 1].nonzero().flatten().tolist() == [4, 5]
    assert batch["labels"][2, 10] == 11 and batch["labels"][3, 5] == -100


def test_distillm2_needs_student_outputs(tiny_tokenizer):
    from mtakd.config import DataConfig
    from mtakd.data import DataError, DataStats, load_records

    records = load_records(str(EXAMPLES / "demo.jsonl"))[:2]
    obj = build_objective(ObjectiveConfig(base="distillm2"))
    with pytest.raises(DataError, match="student_output.*mtakd generate"):
        obj.build_examples(records, tiny_tokenizer, DataConfig(train=["x"], template="alpaca"), spans=None,
                           stats=DataStats(), progress=False)


# ========================================================================================== FDD
def _affine(w):
    return lambda h: h @ w.T


def test_fdd_terms_match_reference_with_and_without_checkpointing():
    g = torch.Generator().manual_seed(0)
    n, d_s, d_t, p = 7, 5, 6, 4
    w_s, w_t = torch.randn(V, d_s, generator=g, dtype=torch.float64), torch.randn(V, d_t, generator=g, dtype=torch.float64)
    hs = [torch.randn(n, d_s, generator=g, dtype=torch.float64) for _ in range(p - 1)] + [torch.randn(n, V, generator=g, dtype=torch.float64)]
    ht = [torch.randn(n, d_t, generator=g, dtype=torch.float64) for _ in range(p - 1)] + [torch.randn(n, V, generator=g, dtype=torch.float64)]
    s_maps = [_affine(w_s)] * (p - 1) + [lambda x: x]
    t_maps = [_affine(w_t)] * (p - 1) + [lambda x: x]
    fkl = OBJECTIVES["fkl"](ObjectiveConfig(base="fkl")).divergence
    grads = []
    for ckpt in (False, True):
        leaves = [h.clone().requires_grad_(True) for h in hs]
        layer, delta = fdd_terms(leaves, ht, s_maps, t_maps, fkl, temperature=2.0, checkpoint=ckpt)
        zs = [m(h) for m, h in zip(s_maps, hs)]
        zt = [m(h) for m, h in zip(t_maps, ht)]
        ref_layer = [ref_kl((zt[i] / 2).softmax(-1), (zs[i] / 2).softmax(-1)).mean() for i in range(p - 1)]
        ref_delta = [ref_kl(((zt[i] - zt[i - 1]) / 2).softmax(-1), ((zs[i] - zs[i - 1]) / 2).softmax(-1)).mean()
                     for i in range(1, p)]
        assert [x.item() for x in layer] == pytest.approx([x.item() for x in ref_layer], rel=1e-10)
        assert [x.item() for x in delta] == pytest.approx([x.item() for x in ref_delta], rel=1e-10)
        (torch.stack(layer).sum() + torch.stack(delta).sum()).backward()
        grads.append([h.grad for h in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_fdd_trajectory_maps():
    assert trajectory(FDDOptions(), 12, 48) == [(l, 4 * l) for l in range(1, 13)]
    assert trajectory(FDDOptions(), 24, 32)[:3] == [(1, 1), (2, 2), (3, 4)]
    assert trajectory(FDDOptions(layers=[6, 9]), 12, 48) == [(6, 24), (9, 36), (12, 48)]
    assert trajectory(FDDOptions(layers=[2, 4], teacher_layers=[3, 8]), 4, 8) == [(2, 3), (4, 8)]
    with pytest.raises(ConfigError, match="out of range"):
        trajectory(FDDOptions(layers=[13]), 12, 48)
    with pytest.raises(ConfigError, match="one teacher block per point"):
        trajectory(FDDOptions(layers=[2, 4], teacher_layers=[3]), 4, 8)
    # reference: exactly the listed points (the public scripts map a subset, e.g. GPT-2 4 6 8 ← 16 24 32)
    assert trajectory(FDDOptions(variant="reference", layers=[4, 6, 8], teacher_layers=[16, 24, 32]), 12, 48) == [
        (4, 16), (6, 24), (8, 32)]
    assert trajectory(FDDOptions(variant="reference", layers=[6, 9]), 12, 48) == [(6, 24), (9, 36)]
    with pytest.raises(ConfigError, match="variant reference needs at least two trajectory points"):
        trajectory(FDDOptions(variant="reference", layers=[12]), 12, 48)
    with pytest.raises(ConfigError, match="options.variant: Input should be .paper. or .reference."):
        build_config({"teacher": {"path": "t"}, "student": {"path": "s"}, "data": {"train": ["x"]},
                      "objective": {"base": "fdd", "options": {"variant": "official"}}})
    with pytest.raises(ConfigError, match="not a token divergence"):
        build_config({"teacher": {"path": "t"}, "student": {"path": "s"}, "data": {"train": ["x"]},
                      "objective": {"base": "fdd", "options": {"divergence": "sft"}}})


# =============================================================================== tiny model pairs
FAMILIES = ("gpt2", "qwen2", "opt")


def tiny_model(family: str, vocab: int, eos: int, layers: int, hidden: int, seed: int):
    from transformers import (GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    torch.manual_seed(seed)
    ids = dict(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    if family == "gpt2":
        cfg = GPT2Config(n_layer=layers, n_embd=hidden, n_head=2, vocab_size=vocab, n_positions=256, **ids)
        return GPT2LMHeadModel(cfg)
    if family == "qwen2":
        cfg = Qwen2Config(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256,
                          tie_word_embeddings=False, **ids)
        return Qwen2ForCausalLM(cfg)
    cfg = OPTConfig(num_hidden_layers=layers, hidden_size=hidden, ffn_dim=2 * hidden, num_attention_heads=2,
                    vocab_size=vocab, word_embed_proj_dim=hidden, max_position_embeddings=256, **ids)
    return OPTForCausalLM(cfg)


def _perturb_norms(model):
    """Random norm weights/biases, so that a final norm is not (almost) idempotent as at its init."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if "norm" in type(module).__name__.lower():
                module.weight.mul_(1 + 0.3 * torch.randn_like(module.weight))
                if getattr(module, "bias", None) is not None:
                    module.bias.add_(0.3 * torch.randn_like(module.bias))
    return model


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """family -> (teacher dir, student dir): 4-block width-48 teachers, 2-block width-32 students."""
    tok = build_tokenizer()
    root = tmp_path_factory.mktemp("pairs")
    out = {}
    for family in FAMILIES:
        dirs = []
        for role, (layers, hidden, seed) in (("teacher", (4, 48, 0)), ("student", (2, 32, 1))):
            d = root / f"{family}-{role}"
            _perturb_norms(tiny_model(family, len(tok), tok.eos_token_id, layers, hidden, seed)).save_pretrained(d)
            tok.save_pretrained(d)
            dirs.append(d)
        out[family] = tuple(dirs)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_logit_lens_and_fdd_objective_match_reference(family, pairs):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(pairs[family][0], dtype=torch.float64).eval()
    student = AutoModelForCausalLM.from_pretrained(pairs[family][1], dtype=torch.float64).eval()
    ids = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :3] = -100
    so, to = (m(ids, output_hidden_states=True) for m in (student, teacher))
    # the last hidden state is already normalised: the last point of the trajectory is the logits themselves
    torch.testing.assert_close(student.get_output_embeddings()(so.hidden_states[-1]), so.logits)
    assert not torch.allclose(logit_lens(student)(so.hidden_states[-1]), so.logits)  # norms are not identities
    norm = {"gpt2": lambda m: m.transformer.ln_f, "qwen2": lambda m: m.model.norm,
            "opt": lambda m: m.model.decoder.final_layer_norm}[family]
    cfg = ObjectiveConfig(base="fdd", kd_ratio=1.0, options={"layer_weight": 0.5, "delta_weight": 2.0})
    obj = OBJECTIVES["fdd"](cfg)
    out = obj(so, to, {"labels": labels}, student=student, teacher=teacher)
    # reference: points (1→2), (2→4); intermediate predictions = lm_head(final_norm(h))
    mask = labels[:, 1:].ne(-100)
    zs = [student.lm_head(norm(student)(so.hidden_states[1]))[:, :-1][mask], so.logits[:, :-1][mask]]
    zt = [teacher.lm_head(norm(teacher)(to.hidden_states[2]))[:, :-1][mask], to.logits[:, :-1][mask]]
    kd = ref_kl(zt[1].softmax(-1), zs[1].softmax(-1)).mean()
    layer = ref_kl(zt[0].softmax(-1), zs[0].softmax(-1)).mean()
    delta = ref_kl((zt[1] - zt[0]).softmax(-1), (zs[1] - zs[0]).softmax(-1)).mean()
    assert out["layer_kd"].item() == pytest.approx(layer.item(), rel=1e-9)
    assert out["delta_kd"].item() == pytest.approx(delta.item(), rel=1e-9)
    assert out["loss"].item() == pytest.approx((kd + 0.5 * layer + 2.0 * delta).item(), rel=1e-9)


def ref_fdd_reference_variant(so, to, student, teacher, attention_mask, labels, points, r, tau, w_layer, w_delta):
    """options.variant: reference, by loops over tokens (docs/objectives.md, FDD): z = lm_head(h) with no final
    norm, forward KL of softmax(z/2) at every listed point, 1 − cos of the change of log_softmax(z) between
    consecutive points, both averaged over every non-padding position with a next token; the FDD terms are
    scaled by kd_ratio with the logit KD."""
    B, T = labels.shape
    z_s = [student.get_output_embeddings()(so.hidden_states[ls]) for ls, _ in points]
    z_t = [teacher.get_output_embeddings()(to.hidden_states[lt]) for _, lt in points]
    positions = [(b, t) for b in range(B) for t in range(T - 1) if attention_mask[b, t] and attention_mask[b, t + 1]]
    response = [(b, t) for b in range(B) for t in range(T - 1) if labels[b, t + 1] != -100]
    layer = []
    for zs, zt in zip(z_s, z_t):
        layer.append(sum(ref_kl((zt[b, t] / 2).softmax(-1), (zs[b, t] / 2).softmax(-1)) for b, t in positions)
                     / len(positions))
    delta = []
    for i in range(1, len(points)):
        total = 0.0
        for b, t in positions:
            ds = z_s[i][b, t].log_softmax(-1) - z_s[i - 1][b, t].log_softmax(-1)
            dt = z_t[i][b, t].log_softmax(-1) - z_t[i - 1][b, t].log_softmax(-1)
            total = total + 1 - (ds @ dt) / (ds.norm() * dt.norm())
        delta.append(total / len(positions))
    ce = sum(-so.logits[b, t].log_softmax(-1)[labels[b, t + 1]] for b, t in response) / len(response)
    kd = sum(ref_kl((to.logits[b, t] / tau).softmax(-1), (so.logits[b, t] / tau).softmax(-1)) for b, t in response) / len(response)
    layer_kd, delta_kd = sum(layer) / len(layer), sum(delta) / len(delta)
    return (1 - r) * ce + r * (kd + w_layer * layer_kd + w_delta * delta_kd), layer_kd, delta_kd


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layers, teacher_layers, points", [
    ([1, 2], [2, 3], [(1, 2), (2, 3)]),  # a mapped subset without the last block: nothing is added
    ("all", None, [(1, 1), (2, 2), (3, 4)]),  # every block, φ(l) = floor(4l/3), the last one included
])
def test_fdd_reference_variant_matches_slow_reference(family, pairs, layers, teacher_layers, points):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(pairs[family][0], dtype=torch.float64).eval()
    cfg_t = teacher.config
    student = _perturb_norms(tiny_model(family, cfg_t.vocab_size, cfg_t.eos_token_id, 3, 32, seed=2)).double().eval()
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 7:] = 0  # right padding
    labels = ids.clone()
    labels[:, :3] = -100
    labels[attention_mask == 0] = -100
    opts = {"variant": "reference", "layers": layers, "teacher_layers": teacher_layers, "layer_weight": 0.5,
            "delta_weight": 2.0}
    obj = OBJECTIVES["fdd"](ObjectiveConfig(base="fdd", kd_ratio=0.6, temperature=1.5, options=opts))
    obj.setup(None, None, student, teacher)
    assert obj.points == points
    so = student(ids, attention_mask=attention_mask, output_hidden_states=True)
    with torch.no_grad():
        to = teacher(ids, attention_mask=attention_mask, output_hidden_states=True)
    out = obj(so, to, {"labels": labels, "attention_mask": attention_mask}, student=student, teacher=teacher)
    ref, layer, delta = ref_fdd_reference_variant(so, to, student, teacher, attention_mask, labels, points,
                                                  r=0.6, tau=1.5, w_layer=0.5, w_delta=2.0)
    assert out["layer_kd"].item() == pytest.approx(layer.item(), rel=1e-9)
    assert out["delta_kd"].item() == pytest.approx(delta.item(), rel=1e-9)
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-9)
    params = [p for p in student.parameters() if p.requires_grad]
    got = torch.autograd.grad(out["loss"], params, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(ref, params, allow_unused=True)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-10)
    # the paper variant (the default) is a different objective on the same outputs
    paper = OBJECTIVES["fdd"](ObjectiveConfig(base="fdd", kd_ratio=0.6, temperature=1.5, options={**opts, "variant": "paper"}))
    paper.setup(None, None, student, teacher)
    assert paper(so, to, {"labels": labels, "attention_mask": attention_mask}, student=student,
                 teacher=teacher)["loss"].item() != pytest.approx(ref.item(), rel=1e-3)


@needs_spacy
def test_generated_examples_have_masked_labels_and_spans(pairs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mtakd.data import Collator, build_examples, load_records

    tok = AutoTokenizer.from_pretrained(pairs["gpt2"][1])
    student = AutoModelForCausalLM.from_pretrained(pairs["gpt2"][1])
    cfg = build_config({"teacher": {"path": "t"}, "student": {"path": "s"},
                        "data": {"train": ["x"], "template": "alpaca", "max_length": 96, "max_prompt_length": 80},
                        "objective": {"base": "distillm", "options": {"max_new_tokens": 6},
                                      "mta": {"key_layers": [{"student": 1, "teacher": 2, "granularity": "word"}]}}})
    obj = build_objective(cfg.objective)
    obj.setup(cfg, tok, student, None)
    records = load_records(str(EXAMPLES / "demo.jsonl"))[:2]
    batch = Collator(tok.pad_token_id)(build_examples(records, tok, cfg.data, spans="all", progress=False))
    torch.manual_seed(0)
    examples = obj.generate_examples(student, batch)
    for i, e in enumerate(examples):
        n = int(batch["labels"][i].ne(-100).nonzero()[0])
        assert e.input_ids[:n] == batch["input_ids"][i, :n].tolist()  # same prompt tokens
        assert e.labels[:n] == [-100] * n and e.labels[n:] == e.input_ids[n:]
        assert 0 < len(e.input_ids) - n <= 6 + 1 + 8  # re-encoding may split differently; + EOS
        for gran in ("word", "phrase"):
            r = e.spans[gran]
            assert r.ndim == 2 and (r[:, 0] < r[:, 1]).all() and (r[:, 1] <= len(e.input_ids)).all()
        prompt_words = membership_to_ranges(batch["word_spans"])[i]
        kept = e.spans["word"][e.spans["word"][:, 1] <= n]
        assert kept.tolist() == prompt_words[prompt_words[:, 1] <= n].tolist()
    collated = obj.collate(examples, torch.device("cpu"))
    assert {"input_ids", "labels", "attention_mask", "word_spans", "phrase_spans"} <= set(collated)


# ============================================================================ `mtakd generate`
def test_generate_cli_writes_the_field_and_keeps_the_record(tmp_path, pairs):
    from mtakd.cli import main

    src = tmp_path / "in.jsonl"
    rows = [json.loads(l) for l in (EXAMPLES / "demo.jsonl").read_text().splitlines()[:3]]
    src.write_text("".join(json.dumps({**r, "id": i}) + "\n" for i, r in enumerate(rows)))
    out = tmp_path / "out.jsonl"
    args = ["generate", "--model", str(pairs["gpt2"][0]), "--data", str(src), "--out", str(out), "--template",
            "alpaca", "--max-new-tokens", "5", "--batch-size", "2", "--seed", "3"]
    assert main(args) == 0
    got = [json.loads(l) for l in out.read_text().splitlines()]
    assert [g["id"] for g in got] == [0, 1, 2]
    assert [g["reference"] for g in got] == [r["output"] for r in rows]  # the old output is kept
    assert main([*args[:4], str(out), *args[5:], "--field", "student_output"]) == 0  # in place
    again = [json.loads(l) for l in out.read_text().splitlines()]
    assert [g["output"] for g in again] == [g["output"] for g in got] and all("student_output" in g for g in again)
    assert main([*args[:7], "--batch-size", "0"]) == 2


# ======================================================================= 2 steps of each base + MTA
def _pairs_file(tmp_path, n=8):
    rows = [json.loads(l) for l in (EXAMPLES / "demo.jsonl").read_text().splitlines()[:n]]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({**r, "student_output": " ".join(r["output"].split()[:10][::-1])}) + "\n"
                            for r in rows))
    return path


OPTIONS = {"fdd": "{}", "distillm": "{init_threshold: 1.0, capacity: 2, max_new_tokens: 6}", "distillm2": "{}"}


FINAL_NORM = {"gpt2": lambda m: m.transformer.ln_f, "qwen2": lambda m: m.model.norm,
              "opt": lambda m: m.model.decoder.final_layer_norm}


def _response(labels):
    """(b, t) positions whose logits predict a response token."""
    return [(b, t) for b in range(labels.shape[0]) for t in range(labels.shape[1] - 1) if labels[b, t + 1] != -100]


def _ref_ce(s, labels, positions):
    return sum(-s[b, t].log_softmax(-1)[labels[b, t + 1]] for b, t in positions) / len(positions)


def ref_base_loss(base, family, s_out, t_out, inputs, student, teacher):
    """The run's L_base (kd_ratio 0.5, τ 1, α 0.1; FDD: every student block, paper variant), by loops over tokens."""
    from mtakd.objectives.base import HiddenHead

    def full(z):  # the trainer fuses the LM heads into the chunked loss (objective.chunk_size): logits here
        return z.head(z.hidden) if isinstance(z, HiddenHead) else z

    s, t, labels = full(s_out.logits).double(), full(t_out.logits).double(), inputs["labels"]
    if base == "distillm2":  # rows 0..n−1: teacher responses (SKL, CE), n..2n−1: student responses (SRKL); β 1
        n = labels.shape[0] // 2
        per_seq = {"skl": [], "srkl": []}
        for b in range(labels.shape[0]):
            pos = [(bb, tt) for bb, tt in _response(labels) if bb == b]
            if not pos:
                continue
            vals = []
            for _, tt in pos:
                p, q = t[b, tt].softmax(-1), s[b, tt].softmax(-1)
                vals.append(ref_kl(p, 0.1 * p + 0.9 * q) if b < n else ref_kl(q, 0.1 * q + 0.9 * p))
            per_seq["skl" if b < n else "srkl"].append(sum(vals) / len(vals))
        kd = sum(per_seq["skl"]) / len(per_seq["skl"]) + sum(per_seq["srkl"]) / len(per_seq["srkl"])
        return 0.5 * _ref_ce(s, labels, _response(labels[:n])) + 0.5 * kd
    pos = _response(labels)
    ce = _ref_ce(s, labels, pos)
    if base == "distillm":  # skew KL(p ‖ αp + (1−α)q)
        kd = sum(ref_kl(t[b, tt].softmax(-1), 0.1 * t[b, tt].softmax(-1) + 0.9 * s[b, tt].softmax(-1)) for b, tt in pos)
        return 0.5 * ce + 0.5 * kd / len(pos)
    # fdd: points (1 → 2), (2 → 4); intermediate predictions lm_head(final_norm(h)); the last point is the logits
    kd = sum(ref_kl(t[b, tt].softmax(-1), s[b, tt].softmax(-1)) for b, tt in pos) / len(pos)
    s_model = student.get_base_model() if hasattr(student, "get_base_model") else student
    zs1 = s_model.get_output_embeddings()(FINAL_NORM[family](s_model)(s_out.hidden_states[1])).double()
    zt2 = teacher.get_output_embeddings()(FINAL_NORM[family](teacher)(t_out.hidden_states[2])).double()
    layer = sum(ref_kl(zt2[b, tt].softmax(-1), zs1[b, tt].softmax(-1)) for b, tt in pos) / len(pos)
    delta = sum(ref_kl((t[b, tt] - zt2[b, tt]).softmax(-1), (s[b, tt] - zs1[b, tt]).softmax(-1)) for b, tt in pos) / len(pos)
    return 0.5 * ce + 0.5 * kd + layer + delta


def ref_mta_loss(s_hidden, t_hidden, attention_mask, spans, projectors, key_layers, lambda_dsa=2.0, lambda_hid=0.2):
    """λ_DSA · mean over key layers of L_DSA + λ_Hid · Σ over key layers of L_Hid (each a mean over sequences),
    teacher weights, from tests/test_mta_functional.py's loop references (MTA_SPEC §4–§7)."""
    from tests.test_mta_functional import ref_dsa, ref_hid, ref_importance, ref_pool

    dsa, hid = [], []
    for proj, (ls, lt, gran) in zip(projectors, key_layers):
        hs, ht = s_hidden[ls].double(), t_hidden[lt].double()
        members = spans[f"{gran}_spans"]
        w = ref_importance(ht, attention_mask)
        units_t, sw = ref_pool(ht, w, members)
        units_s, _ = ref_pool(hs, w, members)
        dsa.append(sum(ref_dsa(units_s, units_t, sw, hs.shape[0])) / hs.shape[0])
        covered = members.bool().any(1)
        hid.append(sum(ref_hid(hs @ proj.weight.double().T, ht, w, covered)) / hs.shape[0])
    return lambda_dsa * sum(dsa) / len(dsa) + lambda_hid * sum(hid)


@needs_spacy
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("base", ["fdd", "distillm", "distillm2"])
def test_two_steps_of_each_base_with_mta(tmp_path, pairs, family, base, monkeypatch):
    from mtakd.cli import main
    from mtakd.trainer import DistillTrainer

    # each training step's loss against the loop references, recomputed from that step's batch and model outputs
    cls, seen, checked = OBJECTIVES[base], {}, []
    prepare, call, compute_loss = cls.prepare_inputs, cls.__call__, DistillTrainer.compute_loss

    def spy_prepare(self, trainer, model, inputs):
        out = prepare(self, trainer, model, inputs)
        seen["inputs"] = dict(out)
        return out

    def spy_call(self, s_out, t_out, batch, **models):
        seen.update(s_out=s_out, t_out=t_out)
        return call(self, s_out, t_out, batch, **models)

    def spy_compute_loss(self, model, inputs, *args, **kwargs):
        loss = compute_loss(self, model, inputs, *args, **kwargs)
        if model.training:
            with torch.no_grad():
                i, s_out, t_out = seen["inputs"], seen["s_out"], seen["t_out"]
                rows = slice(0, int(i.get("mta_rows", len(i["labels"]))))
                projectors = getattr(self.accelerator.unwrap_model(model), "mta_projectors")
                expected = ref_base_loss(base, family, s_out, t_out, i, model, self.teacher) + ref_mta_loss(
                    [h[rows] for h in s_out.hidden_states], [h[rows] for h in t_out.hidden_states],
                    i["attention_mask"][rows], i, projectors, [(1, 2, "word"), (2, 4, "phrase")])
            checked.append((float(loss.detach()), float(expected)))
        return loss

    monkeypatch.setattr(cls, "prepare_inputs", spy_prepare)
    monkeypatch.setattr(cls, "__call__", spy_call)
    monkeypatch.setattr(DistillTrainer, "compute_loss", spy_compute_loss)

    teacher, student = pairs[family]
    data = _pairs_file(tmp_path) if base == "distillm2" else EXAMPLES / "demo.jsonl"
    lora = ["student.lora={r: 4, alpha: 8, dropout: 0.1}"] if family == "opt" else []
    run = tmp_path / "run"
    args = [
        "distill", "--config", str(REPO / "configs" / "tiny-test.yaml"), f"teacher={{path: {teacher}}}",
        f"student={{path: {student}}}", *lora, "data.template=alpaca", f"data.train={data}", "data.max_samples=8",
        "data.max_prompt_length=48", "data.max_length=64",
        f"objective={{base: {base}, options: {OPTIONS[base]}, mta: {{key_layers: [{{student: 1, teacher: 2, "
        "granularity: word}, {student: 2, teacher: 4, granularity: phrase}]}}",
        "training.max_steps=2", "training.per_device_train_batch_size=2", "training.save_steps=100",
        f"training.output_dir={run}", "training.report_to=[none]",
    ]
    assert main(args) == 0
    logs = [h for h in json.loads((run / "log_history.json").read_text()) if "loss" in h]
    assert len(logs) == 2
    expected = {"fdd": ("loss_layer_kd", "loss_delta_kd"), "distillm": ("loss_sgo",), "distillm2": ("loss_skl", "loss_srkl")}
    for h in logs:
        for k in ("loss_base", "loss_dsa", "loss_hid", *expected[base]):
            assert math.isfinite(h[k]), (k, h)
    assert len(checked) == 2
    for (loss, ref), h in zip(checked, logs):
        assert loss == pytest.approx(ref, rel=2e-6)  # float32 run vs float64 reference
        assert h["loss"] == pytest.approx(loss, rel=1e-3, abs=1e-4)  # what the Trainer logs is what it optimised
    if base == "distillm":
        assert logs[0]["loss_sgo"] == 1.0  # θ = 1: the first step trains on student outputs
    assert (run / "student" / "config.json").exists()


@needs_spacy
def test_distillm_buffer_is_checkpointed_and_restored_exactly(tmp_path, pairs):
    from mtakd.cli import main

    teacher, student = pairs["gpt2"]
    run = tmp_path / "run"
    args = [
        "distill", "--config", str(REPO / "configs" / "tiny-test.yaml"), f"teacher={{path: {teacher}}}",
        f"student={{path: {student}}}", "data.template=alpaca", f"data.train={EXAMPLES / 'demo.jsonl'}",
        "data.max_samples=8", "data.max_prompt_length=48", "data.max_length=64",
        "objective={base: distillm, options: {init_threshold: 1.0, capacity: 3, max_new_tokens: 5}, mta: "
        "{key_layers: [{student: 2, teacher: 4, granularity: phrase}]}}",
        "data.validation_size=2", "training.eval_steps=1", "training.extra_args={eval_on_start: true}",
        "training.max_steps=2", "training.per_device_train_batch_size=2", "training.save_steps=1",
        "training.save_total_limit=null", f"training.output_dir={run}", "training.report_to=[none]",
    ]
    assert main(args) == 0
    states = {s: json.loads((run / f"checkpoint-{s}" / "distillm_state-rank0.json").read_text()) for s in (1, 2)}
    assert len(states[1]["buffer"]) == 2 and len(states[2]["buffer"]) == 3 and states[2]["threshold"] == 1.0
    evals = [h["eval_loss_ce"] for h in json.loads((run / "log_history.json").read_text()) if "eval_loss_ce" in h]
    assert len(evals) == 3 and states[1]["prev_loss"] in evals[:2]  # θ adapts on the validation CE
    import shutil

    shutil.rmtree(run / "checkpoint-2")
    assert main([*args, "--resume"]) == 0
    resumed = json.loads((run / "checkpoint-2" / "distillm_state-rank0.json").read_text())
    assert resumed == states[2]  # same buffer, θ and draw RNG as the uninterrupted run
