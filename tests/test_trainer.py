"""DistillTrainer's own pieces: the projector param group, the guarded optimiser step, the frozen teacher,
checkpoint loading messages and the DeepSpeed optimiser check."""

import math

import pytest
import torch
from transformers import TrainingArguments

from mtakd.config import ConfigError, MTAConfig
from mtakd.data import Collator, Example
from mtakd.mta import PROJECTORS, MTALoss
from mtakd.mta.layers import KeyLayer
from mtakd.objectives import build_objective
from mtakd.config import ObjectiveConfig
from mtakd.trainer import DistillTrainer, check_deepspeed_optimizer
from tests.conftest import tiny_llama


def _trainer(tmp_path, **args):
    torch.manual_seed(0)
    student, teacher = tiny_llama(64, layers=2, hidden=16, seed=1), tiny_llama(64, layers=2, hidden=16, seed=2)
    student.train()
    mta = MTALoss(MTAConfig(), [KeyLayer(1, 1, "word"), KeyLayer(2, 2, "phrase")])
    student.add_module(PROJECTORS, torch.nn.ModuleList(torch.nn.Linear(16, 16, bias=False) for _ in range(2)))
    data = [Example(list(range(3 + i, 11 + i)), [-100] * 3 + list(range(6 + i, 11 + i)),
                    {"word": torch.tensor([[0, 2], [3, 5]]).numpy(), "phrase": torch.tensor([[3, 6], [6, 8]]).numpy()})
            for i in range(4)]
    targs = TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                              weight_decay=0.1, report_to=[], remove_unused_columns=False, save_strategy="no",
                              use_cpu=True, **args)
    return DistillTrainer(model=student, args=targs, train_dataset=data, data_collator=Collator(0),
                          teacher=teacher, objective=build_objective(ObjectiveConfig(base="skl")), mta=mta,
                          projector_lr=5e-4)


def test_projectors_have_their_own_lr_and_no_weight_decay_and_the_scheduler_steps(tmp_path):
    trainer = _trainer(tmp_path, lr_scheduler_type="linear")
    trainer.create_optimizer_and_scheduler(num_training_steps=4)  # the scheduler wraps the guarded step
    groups = trainer.optimizer.param_groups
    proj = [g for g in groups if g.get("mtakd_projectors")]
    assert len(proj) == 1 and proj[0]["lr"] == 5e-4 and proj[0]["weight_decay"] == 0.0
    ids = {id(p) for p in getattr(trainer.model, PROJECTORS).parameters()}
    assert {id(p) for p in proj[0]["params"]} == ids
    assert not any(id(p) in ids for g in groups if not g.get("mtakd_projectors") for p in g["params"])
    assert any(g["weight_decay"] == 0.1 for g in groups)  # the student's own groups keep the run's decay
    for p in trainer.model.parameters():
        p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    assert [g["lr"] for g in trainer.optimizer.param_groups][-1] == pytest.approx(5e-4 * 3 / 4)


def test_a_skipped_update_leaves_weights_and_moments_untouched(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.create_optimizer_and_scheduler(num_training_steps=4)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    for p in trainer.model.parameters():
        p.grad = torch.ones_like(p)
    trainer._skip_update = True
    assert trainer.optimizer.step() is None
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    assert not trainer.optimizer.state  # no AdamW moments were created
    trainer.optimizer.step()  # the flag is reset: the next update happens
    assert not all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_the_teacher_stays_in_eval_mode_and_gets_no_gradients(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.teacher.train()  # even if someone flips it, prepare already froze its parameters
    trainer = _trainer(tmp_path)
    seen = []
    trainer.teacher.register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_grad_enabled())))
    trainer.train()
    assert seen and all(mode is False and grad is False for mode, grad in seen)
    assert all(not p.requires_grad and p.grad is None for p in trainer.teacher.parameters())
    assert trainer.state.global_step == 2 and math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_a_tied_weight_missing_from_a_checkpoint_is_not_reported(tmp_path, monkeypatch):
    import transformers.trainer

    warned = []
    monkeypatch.setattr(transformers.trainer.logger, "warning", lambda msg, *a: warned.append(msg % a if a else msg))
    trainer = _trainer(tmp_path)
    trainer.model.config.tie_word_embeddings = True
    trainer.model.lm_head.weight = trainer.model.model.embed_tokens.weight
    state = {k: v for k, v in trainer.model.state_dict().items() if k != "lm_head.weight"}
    trainer._issue_warnings_after_load(trainer.model.load_state_dict(state, strict=False))
    assert warned == []
    del state["model.norm.weight"]  # a genuinely missing key is still reported, without the tied one
    trainer._issue_warnings_after_load(trainer.model.load_state_dict(state, strict=False))
    assert len(warned) == 1 and "model.norm.weight" in warned[0] and "lm_head" not in warned[0]


def test_a_deepspeed_optimizer_section_with_projectors_stops():
    ds = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "zero_optimization": {"stage": 2}}
    with pytest.raises(ConfigError, match="optimizer.*projector_lr"):
        check_deepspeed_optimizer(ds, has_projectors=True)
    check_deepspeed_optimizer(ds, has_projectors=False)  # no projectors: nothing is lost
    check_deepspeed_optimizer({"zero_optimization": {"stage": 2}}, has_projectors=True)


def test_compute_loss_equals_an_independent_computation_of_base_plus_mta(tmp_path):
    """L = (1 − r)·CE + r·SKL + λ_DSA·mean_l L_DSA + λ_Hid·Σ_l L_Hid, recomputed from the models' outputs with
    the slow loop references of the objective and MTA tests (not from the logged parts)."""
    from tests.test_mta_functional import ref_dsa, ref_hid, ref_importance, ref_pool
    from tests.test_objectives import reference

    trainer = _trainer(tmp_path)
    batch = trainer.data_collator(trainer.train_dataset[:2])
    loss = trainer.compute_loss(trainer.model, dict(batch)).item()

    fwd = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    with torch.no_grad():
        s, t = trainer.model(**fwd), trainer.teacher(**fwd)
    cfg = trainer.objective.cfg
    want = reference("skl", s.logits.double(), t.logits.double(), batch["labels"], cfg.kd_ratio, cfg.temperature,
                     cfg.skew_alpha, cfg.gjsd_beta, cfg.akl_mu)["loss"]
    mask, dsa, hid = batch["attention_mask"].bool(), [], 0.0
    for proj, (layer, spans) in zip(getattr(trainer.model, PROJECTORS), [(1, "word_spans"), (2, "phrase_spans")]):
        hs, ht = s.hidden_states[layer].double(), t.hidden_states[layer].double()
        w = ref_importance(ht, mask)
        units_t, sw = ref_pool(ht, w, batch[spans].double())
        units_s, _ = ref_pool(hs, w, batch[spans].double())
        dsa.append(sum(ref_dsa(units_s, units_t, sw, 2)) / 2)
        covered = batch[spans].any(1)
        with torch.no_grad():
            hid += sum(ref_hid(proj(s.hidden_states[layer]).double(), ht, w, covered)) / 2
    want += 2.0 * sum(dsa) / len(dsa) + 0.2 * hid
    assert min(dsa) > 0 and hid > 0
    assert loss == pytest.approx(want, rel=1e-5)
