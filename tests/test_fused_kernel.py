"""objective.fused_kernel (issue 17 part 4, docs/scaling.md): Liger-Kernel's fused linear JSD / cross-entropy as the
base loss of fkl, rkl, js and gjsd. Liger (Triton, CUDA) is absent on CPU: the wiring is tested with stand-in
kernels — slow, direct torch implementations of what Liger documents — and the real kernels are compared with the
chunked loss only where Liger is installed and can run (a CUDA GPU, or Triton's CPU interpreter: TRITON_INTERPRET=1)."""

import os

import pytest
import torch
import torch.nn.functional as F

from mtakd.config import ObjectiveConfig, build_config
from mtakd.objectives import OBJECTIVES
from mtakd.objectives import fused
from mtakd.objectives.base import CachedLogProbs, HiddenHead

B, T, D, V = 3, 8, 5, 11
BASE = {"teacher": {"path": "t"}, "student": {"path": "s"}, "data": {"train": "x.jsonl"}}


# --------------------------------------------------------------------------- stand-in kernels
class RefJSD(torch.nn.Module):
    """LigerFusedLinearJSD's contract: generalised JSD of the teacher p and the student q at a temperature,
    m = β·p + (1−β)·q, β·KL(p‖m) + (1−β)·KL(q‖m); β = 0 / 1: KL(p‖q) / KL(q‖p); mean over rows (no labels)."""

    calls = []

    def __init__(self, jsd_beta=0.5, ignore_index=-100, temperature=1.0):
        super().__init__()
        self.beta, self.temperature = jsd_beta, temperature

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, shift_labels):
        RefJSD.calls.append(dict(beta=self.beta, temperature=self.temperature, rows=student_input.shape[0],
                                 vocab=(student_weight.shape[0], teacher_weight.shape[0]), labels=shift_labels))
        q = torch.softmax(student_input @ student_weight.T / self.temperature, -1)
        p = torch.softmax(teacher_input @ teacher_weight.T / self.temperature, -1)
        if self.beta == 0:
            rows = (p * (p.log() - q.log())).sum(-1)
        elif self.beta == 1:
            rows = (q * (q.log() - p.log())).sum(-1)
        else:
            m = self.beta * p + (1 - self.beta) * q
            rows = self.beta * (p * (p / m).log()).sum(-1) + (1 - self.beta) * (q * (q / m).log()).sum(-1)
        return rows.mean()


class RefCE(torch.nn.Module):
    """LigerFusedLinearCrossEntropyLoss's contract: forward(weight, input, target) = mean CE of input @ weight.T."""

    calls = []

    def __init__(self, reduction="mean"):
        super().__init__()
        assert reduction == "mean"

    def forward(self, lin_weight, _input, target, bias=None):
        RefCE.calls.append(dict(rows=_input.shape[0], vocab=lin_weight.shape[0]))
        return F.cross_entropy(_input @ lin_weight.T, target)


@pytest.fixture
def stand_in(monkeypatch):
    """Liger "installed" (the stand-ins), running on CPU tensors, a "GPU" visible."""
    RefJSD.calls.clear()
    RefCE.calls.clear()
    monkeypatch.setattr(fused, "liger_kernels", lambda: fused.LigerKernels(RefJSD, RefCE))
    monkeypatch.setattr(fused, "DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.fixture
def absent(monkeypatch):
    monkeypatch.setattr(fused, "_import_liger", lambda: (None, "ModuleNotFoundError: No module named 'liger_kernel'"))


def make_labels() -> torch.Tensor:
    """(prompt, response) per row: (2, 5), (4, 2), (1, 7); −100 on prompts and padding."""
    labels = torch.full((B, T), -100, dtype=torch.long)
    g = torch.Generator().manual_seed(3)
    for b, (prompt, response) in enumerate([(2, 5), (4, 2), (1, 7)]):
        labels[b, prompt:prompt + response] = torch.randint(0, V, (response,), generator=g)
    return labels


def make_sides(s_vocab=V, t_vocab=V, bias=False):
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(B, T, D, generator=g, dtype=torch.float64) * 2).requires_grad_()
    head = torch.nn.Linear(D, s_vocab, bias=bias).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(s_vocab, D, generator=g))
    t_hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64) * 2
    t_head = torch.nn.Linear(D, t_vocab, bias=False).double().requires_grad_(False)
    with torch.no_grad():
        t_head.weight.copy_(torch.randn(t_vocab, D, generator=g))
    return hidden, head, t_hidden, t_head


def run(name, fused_kernel, kd_only=False, s_vocab=V, t_vocab=V, labels=None, **cfg):
    """(L_base, CE, KD) of ``name`` from hidden states and heads, and the gradients of L_base (hidden, head weight)."""
    hidden, head, t_hidden, t_head = make_sides(s_vocab, t_vocab)
    obj = OBJECTIVES[name](ObjectiveConfig(base=name, fused_kernel=fused_kernel, chunk_size=4, **cfg))
    labels = make_labels() if labels is None else labels
    s, t = HiddenHead(hidden, head), HiddenHead(t_hidden, t_head)
    if kd_only:
        out = (obj.kd_loss(s, t, labels),)
    else:
        out = obj.base_loss(s, t, labels)
    out[0].backward()
    return [float(x.detach()) for x in out], [hidden.grad.clone(), head.weight.grad.clone()]


# ------------------------------------------------------------------------------------ wiring
@pytest.mark.parametrize("name, beta", [("fkl", 0.0), ("rkl", 1.0), ("js", 0.5), ("gjsd", 0.3)])
def test_liger_path_equals_the_chunked_loss_and_gradients(stand_in, name, beta):
    """Same L_base, CE, KD and gradients as the chunked path, with the kernel given the base's β, the temperature,
    only the response rows and no labels (its mean is then over exactly those rows)."""
    settings = dict(kd_ratio=0.3, temperature=2.0, gjsd_beta=0.3)
    want, want_grads = run(name, "none", **settings)
    assert not RefJSD.calls
    got, got_grads = run(name, "liger", **settings)
    n = int(make_labels()[:, 1:].ne(-100).sum())
    assert RefJSD.calls == [dict(beta=beta, temperature=2.0, rows=n, vocab=(V, V), labels=None)]
    assert RefCE.calls == [dict(rows=n, vocab=V)]
    assert got == pytest.approx(want, rel=1e-9)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    assert got[0] == pytest.approx(0.7 * got[1] + 0.3 * got[2], rel=1e-12)  # kd_ratio mixing


@pytest.mark.parametrize("s_vocab, t_vocab", [(V, V + 3), (V + 3, V)])
def test_padded_vocabularies_kd_on_the_shared_rows_ce_on_the_students(stand_in, s_vocab, t_vocab):
    want, want_grads = run("fkl", "none", s_vocab=s_vocab, t_vocab=t_vocab)
    got, got_grads = run("fkl", "liger", s_vocab=s_vocab, t_vocab=t_vocab)
    assert RefJSD.calls[0]["vocab"] == (V, V) and RefCE.calls[0]["vocab"] == s_vocab
    assert got == pytest.approx(want, rel=1e-9)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_kd_loss_skips_the_cross_entropy_kernel(stand_in):
    want, want_grads = run("js", "none", kd_only=True)
    got, got_grads = run("js", "liger", kd_only=True)
    assert len(RefJSD.calls) == 1 and not RefCE.calls
    assert got == pytest.approx(want, rel=1e-9)
    torch.testing.assert_close(got_grads[0], want_grads[0], rtol=1e-9, atol=1e-12)


def test_no_response_token_is_a_zero_loss_with_zero_gradients(stand_in):
    got, grads = run("fkl", "liger", labels=torch.full((B, T), -100))
    assert got == [0.0, 0.0, 0.0] and not RefJSD.calls
    assert all(float(g.abs().sum()) == 0 for g in grads)


def test_the_trainer_hands_liger_the_models_heads(stand_in, tmp_path):
    """Through DistillTrainer.compute_loss (tiny Llamas, with MTA): the real LM heads reach the kernels, and the
    loss (base + MTA) and every student gradient equal the chunked path's."""
    from transformers import TrainingArguments

    from mtakd.config import MTAConfig
    from mtakd.data import Collator, Example
    from mtakd.mta import PROJECTORS, MTALoss
    from mtakd.mta.layers import KeyLayer
    from mtakd.objectives import build_objective
    from mtakd.trainer import DistillTrainer
    from tests.conftest import tiny_llama

    data = [Example(list(range(3 + i, 11 + i)), [-100] * 3 + list(range(6 + i, 11 + i)),
                    {"word": torch.tensor([[0, 2], [3, 5]]).numpy(), "phrase": torch.tensor([[3, 6], [6, 8]]).numpy()})
            for i in range(2)]
    results = []
    for kernel in ("none", "liger"):
        student, teacher = tiny_llama(64, layers=2, hidden=16, seed=1), tiny_llama(64, layers=2, hidden=16, seed=2)
        student.train()
        torch.manual_seed(5)
        student.add_module(PROJECTORS, torch.nn.ModuleList(torch.nn.Linear(16, 16, bias=False) for _ in range(2)))
        args = TrainingArguments(str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                                 remove_unused_columns=False, save_strategy="no", use_cpu=True)
        trainer = DistillTrainer(
            model=student, args=args, train_dataset=data, data_collator=Collator(0), teacher=teacher,
            objective=build_objective(ObjectiveConfig(base="js", fused_kernel=kernel, kd_ratio=0.4)),
            mta=MTALoss(MTAConfig(), [KeyLayer(1, 1, "word"), KeyLayer(2, 2, "phrase")]))
        loss = trainer.compute_loss(trainer.model, dict(trainer.data_collator(data)))
        loss.backward()
        results.append((float(loss.detach()), [p.grad.clone() for p in student.parameters() if p.grad is not None]))
    assert len(RefJSD.calls) == 1 and len(RefCE.calls) == 1
    (want, want_grads), (got, got_grads) = results
    assert got == pytest.approx(want, rel=1e-5)
    assert len(got_grads) == len(want_grads)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------ fallback and errors
def test_auto_falls_back_to_the_chunked_loss(stand_in, monkeypatch):
    want, _ = run("skl", "none")
    assert run("skl", "auto")[0] == pytest.approx(want, rel=1e-12)  # no Liger kernel for the skew KL
    monkeypatch.setattr(fused, "DEVICE_TYPES", ("cuda",))
    want, _ = run("fkl", "none")
    assert run("fkl", "auto")[0] == pytest.approx(want, rel=1e-12)  # CPU tensors
    assert not RefJSD.calls and not RefCE.calls


def test_auto_without_liger_never_fails(absent):
    cfg = build_config({**BASE, "objective": {"base": "fkl", "fused_kernel": "auto"}})
    assert cfg.objective.fused_kernel == "auto"
    want, _ = run("fkl", "none")
    assert run("fkl", "auto")[0] == pytest.approx(want, rel=1e-12)


def test_an_inner_divergence_of_another_base_never_uses_the_kernel(stand_in):
    """FDD (and the like) build their divergence from the run's objective section: only the base itself dispatches."""
    obj = OBJECTIVES["fkl"](ObjectiveConfig(base="fdd", fused_kernel="auto"))
    hidden, head, t_hidden, t_head = make_sides()
    obj.base_loss(HiddenHead(hidden, head), HiddenHead(t_hidden, t_head), make_labels())
    assert not RefJSD.calls


def test_liger_refuses_at_run_time_what_it_cannot_compute(stand_in, monkeypatch):
    obj = OBJECTIVES["fkl"](ObjectiveConfig(base="fkl", fused_kernel="liger"))
    hidden, head, t_hidden, t_head = make_sides()
    labels = make_labels()
    with pytest.raises(fused.FusedKernelError, match="full logits"):
        obj.base_loss(head(hidden), t_head(t_hidden), labels)
    with pytest.raises(fused.FusedKernelError, match="teacher cache"):
        obj.base_loss(HiddenHead(hidden, head), CachedLogProbs(torch.zeros(1, V), None), labels)
    biased = make_sides(bias=True)[1]
    with pytest.raises(fused.FusedKernelError, match="bias-free linear"):
        obj.base_loss(HiddenHead(hidden, biased), HiddenHead(t_hidden, t_head), labels)
    with pytest.raises(fused.FusedKernelError, match="bias-free linear"):
        obj.base_loss(HiddenHead(hidden, lambda x: head(x)), HiddenHead(t_hidden, t_head), labels)
    monkeypatch.setattr(fused, "DEVICE_TYPES", ("cuda",))
    with pytest.raises(fused.FusedKernelError, match="need a CUDA GPU"):
        obj.base_loss(HiddenHead(hidden, head), HiddenHead(t_hidden, t_head), labels)


def test_config_liger_is_checked_up_front(stand_in, monkeypatch):
    ok = build_config({**BASE, "objective": {"base": "gjsd", "fused_kernel": "liger", "mta": {"enabled": True}}})
    assert ok.objective.fused_kernel == "liger"  # MTA is independent of the base loss
    assert build_config({**BASE}).objective.fused_kernel == "none"
    for objective, message in [
        ({"base": "skl"}, "only for the bases fkl, rkl, js, gjsd"),
        ({"base": "tvd"}, "not for 'tvd'"),
        ({"base": "fkl", "chunk_size": 0}, "chunk_size: 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            build_config({**BASE, "objective": {**objective, "fused_kernel": "liger"}})
    with pytest.raises(ValueError, match="teacher cache"):
        build_config({**BASE, "teacher": {"path": "t", "cache": "c"}, "objective": {"base": "fkl", "fused_kernel": "liger"}})
    build_config({**BASE, "teacher": {"path": "t", "cache": "c"}, "objective": {"base": "fkl", "fused_kernel": "auto"}})
    with pytest.raises(ValueError, match="none"):
        build_config({**BASE, "objective": {"base": "fkl", "fused_kernel": "triton"}})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="need a CUDA GPU"):
        build_config({**BASE, "objective": {"base": "fkl", "fused_kernel": "liger"}})


def test_config_liger_not_installed(absent):
    with pytest.raises(ValueError, match=r"cannot be imported .*pip install 'mtakd\[liger\]'"):
        build_config({**BASE, "objective": {"base": "fkl", "fused_kernel": "liger"}})


# ------------------------------------------------------------------------------------ the real kernels
def test_real_liger_kernels_match_the_chunked_loss():
    """Liger-Kernel itself (optional) against mtakd's chunked loss for each covered base, values and gradients:
    on a CUDA GPU, or on CPU under Triton's interpreter (TRITON_INTERPRET=1, slow); skipped otherwise."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not torch.cuda.is_available() and not interpret:
        pytest.skip("Liger-Kernel's Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1)")
    pytest.importorskip("liger_kernel.transformers")
    kernels = fused.liger_kernels()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in fused.LIGER_BASES:
        cfg = ObjectiveConfig(base=name, kd_ratio=0.3, temperature=2.0, gjsd_beta=0.3, chunk_size=4)
        results = []
        for use_liger in (False, True):
            hidden, head, t_hidden, t_head = (x.float().to(device) for x in make_sides(t_vocab=V + 2))
            hidden = hidden.detach().requires_grad_()
            s, t, labels = HiddenHead(hidden, head), HiddenHead(t_hidden, t_head), make_labels().to(device)
            if use_liger:
                out = fused.liger_base_loss(kernels, s, t, labels, beta=fused.liger_beta(cfg), temperature=2.0,
                                            kd_ratio=0.3)
            else:
                out = OBJECTIVES[name](cfg).base_loss(s, t, labels)
            out[0].backward()
            results.append(([float(x.detach()) for x in out], hidden.grad.cpu(), head.weight.grad.cpu()))
        (want, *want_grads), (got, *got_grads) = results
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7), name  # measured (interpreter): ~1e-7
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=name)
