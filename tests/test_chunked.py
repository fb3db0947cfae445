"""Chunked, LM-head-fused losses (``objective.chunk_size``, issue 17): every divergence equals the unchunked one in
value and gradients, the full logits are never built, and the trainer fuses the heads only where that is exact."""

import functools
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mtakd.config import ObjectiveConfig
from mtakd.objectives import OBJECTIVES, TokenDivergence
from mtakd.objectives.base import CachedLogProbs, HiddenHead, response_positions

B, T, D, V = 4, 9, 6, 13
TOKEN_LEVEL = sorted(n for n, c in OBJECTIVES.items() if issubclass(c, TokenDivergence))
OPTIONS = {"distillm": {"student_generation": False}}


def make_labels() -> torch.Tensor:
    """(prompt, response) per row: (2, 6), (3, 2), (1, 7), (4, 0) — the last row has no response token."""
    labels = torch.full((B, T), -100, dtype=torch.long)
    g = torch.Generator().manual_seed(3)
    for b, (prompt, response) in enumerate([(2, 6), (3, 2), (1, 7), (4, 0)]):
        labels[b, prompt:prompt + response] = torch.randint(0, V, (response,), generator=g)
    return labels


def make_sides(teacher_vocab: int = V):
    torch.manual_seed(0)  # the heads' initialisation
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(B, T, D, generator=g, dtype=torch.float64) * 2).requires_grad_()
    head = torch.nn.Linear(D, V).double()
    t_hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64) * 2
    t_head = torch.nn.Linear(D, teacher_vocab).double().requires_grad_(False)
    return hidden, head, t_hidden, t_head


def loss_and_grads(name, chunk, fused, teacher_vocab=V, **cfg):
    """(logged losses, gradients of the loss in the student's hidden state and head weight and bias)."""
    hidden, head, t_hidden, t_head = make_sides(teacher_vocab)
    obj = OBJECTIVES[name](ObjectiveConfig(base=name, chunk_size=chunk, options=OPTIONS.get(name, {}), **cfg))
    if fused:  # "generic": a head wrapped in another module (as a LoRA-wrapped one): its parameters get the gradients
        s_head = torch.nn.Sequential(head) if fused == "generic" else head
        s, t = HiddenHead(hidden, s_head), HiddenHead(t_hidden, t_head)
    else:
        s, t = head(hidden), t_head(t_hidden)
    out = obj(SimpleNamespace(logits=s), SimpleNamespace(logits=t), {"labels": make_labels()})
    (3 * out["loss"]).backward()  # the upstream gradient reaches the fused chunks' stored gradients
    return {k: float(v.detach()) for k, v in out.items()}, [hidden.grad, head.weight.grad, head.bias.grad]


def assert_close_rel(got, want, rel=1e-6):
    for g, w in zip(got, want):
        assert (g - w).norm() <= rel * w.norm(), float((g - w).norm() / w.norm())


@pytest.mark.parametrize("name", TOKEN_LEVEL + ["distillm2", "sft"])
@pytest.mark.parametrize("chunk, fused", [(1, False), (4, False), (4, True), (4, "generic"), (1000, True)])
def test_chunked_equals_unchunked_in_value_and_gradients(name, chunk, fused):
    """Chunks of 1 and 4 response rows (of 15), from logits or fused with the LM head, τ 1.7, kd_ratio 0.3."""
    cfg = {"temperature": 1.7, "kd_ratio": 0.3}
    want_parts, want = loss_and_grads(name, 0, False, **cfg)
    got_parts, got = loss_and_grads(name, chunk, fused, **cfg)
    assert set(got_parts) == set(want_parts)
    for k in want_parts:
        assert got_parts[k] == pytest.approx(want_parts[k], rel=1e-9, abs=1e-12), k
    assert_close_rel(got, want)


@pytest.mark.parametrize("chunk, fused", [(0, False), (4, True)])
def test_kd_ratio_1_logs_the_ce_outside_the_graph(chunk, fused, monkeypatch):
    """kd_ratio 1 (DistiLLM's configs): the CE has weight 0 — logged with the same value, never differentiated
    (no log-softmax backward per chunk); the loss and gradients are the KD's alone."""
    import torch.nn.functional as F

    want_parts, want = loss_and_grads("fkl", chunk, fused, kd_ratio=1.0)
    differentiated = []
    ce = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda x, *a, **k: differentiated.append(x.requires_grad) or ce(x, *a, **k))
    got_parts, got = loss_and_grads("fkl", chunk, fused, kd_ratio=1.0)
    assert differentiated and not any(differentiated)
    assert got_parts == pytest.approx(want_parts, rel=1e-12) and got_parts["loss"] == pytest.approx(got_parts["kd"])
    assert got_parts["ce"] > 0
    assert_close_rel(got, want, rel=0)


@pytest.mark.parametrize("name", ["fkl", "skl", "akl", "distillm2"])
def test_padded_teacher_vocabulary_is_cut_the_same_way(name):
    """A teacher head with 3 padded rows (as Qwen's 152064 vs 151936): the shared vocabulary, chunked or not."""
    want_parts, want = loss_and_grads(name, 0, False, teacher_vocab=V + 3)
    got_parts, got = loss_and_grads(name, 3, True, teacher_vocab=V + 3)
    assert got_parts["loss"] == pytest.approx(want_parts["loss"], rel=1e-9)
    assert_close_rel(got, want)


@pytest.mark.parametrize("name", TOKEN_LEVEL)
@pytest.mark.parametrize("top_k", [None, 4])
def test_chunked_on_a_teacher_cache(name, top_k):
    """Full-vocabulary and top-k caches (docs/teacher_cache.md) give the unchunked loss and gradients."""
    labels = make_labels()
    mask, _ = response_positions(labels)
    hidden, head, t_hidden, t_head = make_sides()
    with torch.no_grad():
        t_logp = torch.log_softmax(t_head(t_hidden)[:, :-1][mask], -1)
    cache = CachedLogProbs(t_logp, None) if top_k is None else CachedLogProbs.top_k(t_logp, top_k)
    results = []
    for chunk, fused in [(0, False), (2, True)]:
        hidden.grad = None
        head.zero_grad()
        obj = OBJECTIVES[name](ObjectiveConfig(base=name, chunk_size=chunk, options=OPTIONS.get(name, {})))
        s = HiddenHead(hidden, head) if fused else head(hidden)
        out = obj(SimpleNamespace(logits=s), SimpleNamespace(logits=cache), {"labels": labels})
        out["loss"].backward()
        results.append((float(out["loss"].detach()), [hidden.grad.clone(), head.weight.grad.clone()]))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-9)
    assert_close_rel(results[1][1], results[0][1])


def test_fdd_logit_term_is_chunked_too():
    """FDD's CE + logit KD (its layer terms need the models; here the base part alone) equals the unchunked one."""
    want, gw = loss_and_grads("fdd", 0, False)
    got, gg = loss_and_grads("fdd", 2, False)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-9)
    assert_close_rel(gg, gw)


class LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor an operator produced."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name", ["fkl", "skl", "akl", "distillm2"])
def test_fused_chunks_never_build_more_than_one_chunk_of_logits(name):
    """Forward and backward: no tensor larger than chunk × V (unchunked: the response rows × V, and the
    [B, T, V] logits of both models)."""
    vocab, chunk = 5000, 2
    hidden = torch.randn(B, T, D, requires_grad=True)
    head, t_head = torch.nn.Linear(D, vocab), torch.nn.Linear(D, vocab).requires_grad_(False)
    t_hidden = torch.randn(B, T, D)
    labels = make_labels()
    n = int(response_positions(labels)[0].sum())
    sizes = {}
    for c in (0, chunk):
        obj = OBJECTIVES[name](ObjectiveConfig(base=name, chunk_size=c))
        with LargestTensor() as seen:
            s, t = (HiddenHead(hidden, head), HiddenHead(t_hidden, t_head)) if c else (head(hidden), t_head(t_hidden))
            obj(SimpleNamespace(logits=s), SimpleNamespace(logits=t), {"labels": labels})["loss"].backward()
        sizes[c] = seen.largest
    assert sizes[0] >= B * T * vocab
    assert sizes[chunk] <= max(chunk * vocab, vocab * D + vocab) < n * vocab


# ------------------------------------------------------------------------------------------ trainer
def _trainer(tmp_path, chunk, base="skl", mta=True):
    from transformers import TrainingArguments

    from mtakd.config import MTAConfig
    from mtakd.data import Collator, Example
    from mtakd.mta import PROJECTORS, MTALoss
    from mtakd.mta.layers import KeyLayer
    from mtakd.objectives import build_objective
    from mtakd.trainer import DistillTrainer
    from tests.conftest import tiny_llama

    student, teacher = tiny_llama(64, layers=2, hidden=16, seed=1), tiny_llama(64, layers=2, hidden=16, seed=2)
    student.train()
    loss = None
    if mta:
        loss = MTALoss(MTAConfig(), [KeyLayer(1, 1, "word"), KeyLayer(2, 2, "phrase")])
        torch.manual_seed(5)
        student.add_module(PROJECTORS, torch.nn.ModuleList(torch.nn.Linear(16, 16, bias=False) for _ in range(2)))
    data = [Example(list(range(3 + i, 11 + i)), [-100] * 3 + list(range(6 + i, 11 + i)),
                    {"word": torch.tensor([[0, 2], [3, 5]]).numpy(), "phrase": torch.tensor([[3, 6], [6, 8]]).numpy()})
            for i in range(4)]
    args = TrainingArguments(str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                             remove_unused_columns=False, save_strategy="no", use_cpu=True)
    return DistillTrainer(model=student, args=args, train_dataset=data, data_collator=Collator(0), teacher=teacher,
                          objective=build_objective(ObjectiveConfig(base=base, chunk_size=chunk, options=OPTIONS.get(base, {}))),
                          mta=loss)


@pytest.mark.parametrize("base, mta", [("skl", True), ("fkl", False), ("sft", True), ("distillm", False)])
def test_trainer_fuses_the_heads_with_the_unchunked_loss_and_gradients(tmp_path, base, mta):
    results = []
    for chunk in (0, 3):
        trainer = _trainer(tmp_path, chunk, base, mta)
        batch = trainer.data_collator(trainer.train_dataset[:2])
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        grads = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
        results.append((float(loss.detach()), grads, trainer._fuse))
    (l0, g0, fused0), (l1, g1, fused1) = results
    assert not fused0 and fused1
    assert l1 == pytest.approx(l0, rel=1e-6)
    assert len(g1) == len(g0)
    assert_close_rel(g1, g0, rel=1e-5)  # float32 models


def test_trainer_runs_the_models_without_full_logits(tmp_path, monkeypatch):
    """The fused path asks both models for the last position's logits only (``logits_to_keep=1``)."""
    trainer = _trainer(tmp_path, 4)
    seen = []
    for m in (trainer.model, trainer.teacher):
        def spy(*a, _real=m.forward, **k):
            seen.append(k.get("logits_to_keep"))
            return _real(*a, **k)

        monkeypatch.setattr(m, "forward", functools.wraps(m.forward)(spy))  # keeps the signature
    trainer.compute_loss(trainer.model, dict(trainer.data_collator(trainer.train_dataset[:2])))
    assert seen == [1, 1]


def test_a_head_that_does_not_reproduce_the_logits_is_not_fused(tmp_path, monkeypatch):
    """Logit soft-capping (e.g. Gemma 2) is refused up front; any other mismatch is caught at the first batch and
    that batch is recomputed with full logits (same loss as chunk_size 0)."""
    from mtakd.models import plain_head

    trainer = _trainer(tmp_path, 4)
    trainer.model.config.final_logit_softcapping = 30.0
    assert not plain_head(trainer.model)
    trainer.model.config.final_logit_softcapping = None
    assert plain_head(trainer.model)

    batch = trainer.data_collator(trainer.train_dataset[:2])
    unfused = _trainer(tmp_path, 0)
    want = float(unfused.compute_loss(unfused.model, dict(batch)).detach())
    cls = type(trainer.model)
    real = cls.get_output_embeddings
    monkeypatch.setattr(cls, "get_output_embeddings",  # the student's head as the loss would see it: off by ×2
                        lambda self: (lambda h: real(self)(h) * 2.0) if self is trainer.model else real(self))
    got = float(trainer.compute_loss(trainer.model, dict(batch)).detach())
    assert trainer._fuse is False
    assert got == pytest.approx(want, rel=1e-6)


# Liger-Kernel (objective.fused_kernel) against this chunked loss: tests/test_fused_kernel.py


# ----------------------------------------------------------------------------- no needless [N, V] or [B, T, d]
class _Ops(TorchDispatchMode):
    """The names of the ops that produce a tensor of ``numel``."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.numel() == self.numel
               for t in (out if isinstance(out, (tuple, list)) else [out])):
            self.ops.append(func.overloadpacket.__name__)
        return out


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_temperature_1_and_skew_0_add_no_chunk_copies(temperature):
    """At τ = 1 the logits are not divided (a [C, V] copy per side, and its gradient, for the same values), and a
    mixture of weight 0 or 1 is one side itself (no three [C, V] tensors of log-sum-exp); values and gradients are
    those of the general formulas (test_chunked_equals_unchunked_in_value_and_gradients covers the rest)."""
    from mtakd.objectives.gjsd import log_mixture

    g = torch.Generator().manual_seed(1)
    a = torch.randn(5, 7, generator=g).log_softmax(-1).requires_grad_()
    b = torch.randn(5, 7, generator=g).log_softmax(-1).requires_grad_()
    assert log_mixture(a, b, 0.0) is b and log_mixture(a, b, 1.0) is a
    assert torch.equal(torch.logaddexp(a + float("-inf"), b), b)  # what the general formula gives at w = 0

    vocab, chunk = 5000, 2
    hidden = torch.randn(B, T, D, requires_grad=True)
    head, t_head = torch.nn.Linear(D, vocab), torch.nn.Linear(D, vocab).requires_grad_(False)
    obj = OBJECTIVES["skl"](ObjectiveConfig(base="skl", chunk_size=chunk, skew_alpha=0.0, temperature=temperature))
    with _Ops(chunk * vocab) as seen:
        out = obj(SimpleNamespace(logits=HiddenHead(hidden, head)),
                  SimpleNamespace(logits=HiddenHead(torch.randn(B, T, D), t_head)), {"labels": make_labels()})
        out["loss"].backward()
    assert ("div" in seen.ops) == (temperature != 1)
    assert "logaddexp" not in seen.ops


@pytest.mark.parametrize("base, mta", [("fkl", False), ("distillm", False), ("skl", True)])
def test_fused_forwards_keep_only_the_hidden_states_that_are_read(tmp_path, base, mta):
    """Fused heads without MTA (or an objective reading the layers): each model's outputs carry only its last
    hidden state — the teacher runs under no_grad, so every other layer's [B, T, d] would be kept for nothing —
    and it is the one output_hidden_states=True gives last; with MTA, every layer's."""
    trainer = _trainer(tmp_path, 3, base, mta)
    batch = trainer.data_collator(trainer.train_dataset[:2])
    outs = []
    real = trainer._forward
    trainer._forward = lambda *a, **k: outs.append(real(*a, **k)) or outs[-1]
    trainer.compute_loss(trainer.model, dict(batch))
    assert trainer._fuse and len(outs) == 2  # student, teacher
    fwd = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    for model, out in zip((trainer.model, trainer.teacher), outs):
        with torch.no_grad():
            full = model(**fwd, output_hidden_states=True)
        assert len(out.hidden_states) == (len(full.hidden_states) if mta else 1)
        assert torch.equal(out.hidden_states[-1].detach(), full.hidden_states[-1])
        assert out.logits.shape[1] == 1
