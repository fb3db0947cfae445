"""Mixed precision on CPU: ``training.bf16`` runs the models under CPU autocast; every base objective trains with and
without MTA, with LoRA, from a teacher cache and with chunked or unchunked losses; MTA's geometry and the projectors
stay float32; a float32 student keeps float32 (master) weights; a bf16 run resumes exactly. ``training.fp16`` is
refused on CPU (accelerate would silently train in float32).

Tiny models (a 4-layer 32-wide teacher, a 2-layer 16-wide student, 400-token vocabulary), 4 examples, 2 steps."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mtakd.cli import main
from mtakd.objectives import OBJECTIVES
from tests.conftest import needs_spacy, write_tiny_run_config

BASE_OPTIONS = {"distillm": {"init_threshold": 1.0, "capacity": 2, "max_new_tokens": 4}}


def _logs(run):
    return [h for h in json.loads((run / "log_history.json").read_text()) if "loss" in h]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_teacher_dir, tiny_narrow_student_dir, equal_length_jsonl):
    """``config(name, objective=..., training=..., ...)``: a tiny run config (skl + MTA on two key layers, bf16, 2 steps
    of 2 sequences); the data rows also carry a ``student_output`` for DistiLLM-2."""
    root = tmp_path_factory.mktemp("mixed_precision")
    data = root / "train.jsonl"
    rows = [json.loads(line) for line in equal_length_jsonl.read_text().splitlines()]
    data.write_text("".join(json.dumps({**r, "student_output": " ".join(r["output"].split()[:12][::-1])}) + "\n"
                            for r in rows))

    def config(name, **sections):
        sections = {k: dict(v) for k, v in sections.items()}
        sections["training"] = {"bf16": True, "max_steps": 2, "per_device_train_batch_size": 2,
                                **sections.get("training", {})}
        sections["data"] = {"max_samples": 4, **sections.get("data", {})}
        return write_tiny_run_config(root / f"{name}.yaml", tiny_teacher_dir, tiny_narrow_student_dir, data,
                                     root / name, root / "spans", **sections)

    return root, config


def _mta(enabled=True):
    return {"enabled": enabled, "key_layers": [{"student": 1, "teacher": 2, "granularity": "word"},
                                               {"student": 2, "teacher": 4, "granularity": "phrase"}]}


def _assert_finite(run, mta=True, steps=2):
    logs = _logs(run)
    assert len(logs) == steps
    for h in logs:
        keys = [k for k in h if k == "loss" or k.startswith("loss_")]
        assert "loss_base" in keys and (not mta or {"loss_dsa", "loss_hid"} <= set(keys)), h
        for k in keys:
            assert math.isfinite(h[k]), (k, h)
    return logs


@pytest.fixture
def spy_precision(monkeypatch):
    """Records the dtypes of the student's Linear outputs in its training forward passes (bf16 under autocast;
    accelerate casts the model's returned outputs back to float32), whether MTA ran with autocast off, the dtypes of the tensors MTA's functions saw, and
    the projectors' output dtype."""
    import mtakd.mta.loss as mta_loss
    from mtakd.trainer import DistillTrainer

    seen = {"linear": set(), "mta_autocast": [], "mta_dtypes": set(), "projector_out": set()}
    real_forward = DistillTrainer._forward

    def forward(self, model, fwd, need_hidden, fuse):
        if not (model is self.model and model.training):
            return real_forward(self, model, fwd, need_hidden, fuse)

        def linear_out(module, args, out):
            if isinstance(module, torch.nn.Linear):
                seen["linear"].add(out.dtype)

        hook = torch.nn.modules.module.register_module_forward_hook(linear_out)
        try:
            return real_forward(self, model, fwd, need_hidden, fuse)
        finally:
            hook.remove()

    monkeypatch.setattr(DistillTrainer, "_forward", forward)

    def record(fn):
        def wrapped(*args, **kwargs):
            seen["mta_autocast"].append(torch.is_autocast_enabled("cpu"))
            seen["mta_dtypes"].update(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
            out = fn(*args, **kwargs)
            outs = out if isinstance(out, tuple) else (out,)
            seen["mta_dtypes"].update(o.dtype for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point())
            return out
        return wrapped

    for name in ("importance_weights", "pool_spans", "dsa_per_sequence", "hid_per_sequence"):
        monkeypatch.setattr(mta_loss, name, record(getattr(mta_loss, name)))
    real_terms = mta_loss.MTALoss._terms

    def terms(self, student_hidden, teacher_hidden, mask, spans, projectors, *args):
        hooks = [p.register_forward_hook(lambda m, i, o: seen["projector_out"].add(o.dtype)) for p in projectors or []]
        try:
            return real_terms(self, student_hidden, teacher_hidden, mask, spans, projectors, *args)
        finally:
            for h in hooks:
                h.remove()

    monkeypatch.setattr(mta_loss.MTALoss, "_terms", terms)
    return seen


# ---------------------------------------------------------------------------------------------- unit
def test_mta_terms_under_autocast_equal_float32_terms_of_the_upcast_states():
    """MTA called inside bf16 autocast with bf16 states gives exactly the float32 computation on the upcast states
    (autocast would otherwise run the score matmuls and the projections in bf16, ~1e-2 relative off)."""
    from mtakd.config import MTAConfig
    from mtakd.mta import MTALoss
    from mtakd.mta.layers import KeyLayer
    from tests.test_distributed import _padded_batch

    keys = [KeyLayer(student=1, teacher=2, granularity="word"), KeyLayer(student=2, teacher=4, granularity="phrase")]
    mta = MTALoss(MTAConfig(), keys)
    projectors = mta.build_projectors(16, 32, from_teacher=False)
    s, t, mask, spans = _padded_batch([9, 5, 7, 3], t=9)
    s16, t16 = tuple(h.bfloat16() for h in s), tuple(h.bfloat16() for h in t)
    want = mta(tuple(h.float() for h in s16), tuple(h.float() for h in t16), mask, spans, projectors)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mta(s16, t16, mask, spans, projectors)
    for k in ("dsa", "hid"):
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


# --------------------------------------------------------------------------------------- every base
@needs_spacy
@pytest.mark.parametrize("mta", [True, False], ids=["mta", "no_mta"])
@pytest.mark.parametrize("base", sorted(OBJECTIVES))
def test_every_base_trains_in_bf16_on_cpu(setup, base, mta, spy_precision):
    root, config = setup
    name = f"{base}-{'mta' if mta else 'plain'}"
    objective = {"base": base, "options": BASE_OPTIONS.get(base, {}), "mta": _mta(mta)}
    assert main(["distill", "--config", str(config(name, objective=objective))]) == 0
    _assert_finite(root / name, mta=mta)
    assert spy_precision["linear"] == {torch.bfloat16}  # the student really ran under bf16 autocast
    if mta:
        assert spy_precision["mta_autocast"] and not any(spy_precision["mta_autocast"])
        assert spy_precision["mta_dtypes"] == {torch.float32}
        assert spy_precision["projector_out"] == {torch.float32}
    student = load_file(root / name / "student" / "model.safetensors")
    assert {v.dtype for v in student.values()} == {torch.float32}


# -------------------------------------------------------------------------- weights, LoRA, cache, chunks
@needs_spacy
def test_float32_student_keeps_float32_master_weights_and_bf16_stays_close_to_float32(setup, monkeypatch):
    from mtakd.trainer import DistillTrainer

    root, config = setup
    seen = {}
    real_step = DistillTrainer.training_step

    def training_step(self, model, inputs, *args, **kwargs):
        loss = real_step(self, model, inputs, *args, **kwargs)
        seen["params"] = {p.dtype for p in model.parameters()}
        seen["grads"] = {p.grad.dtype for p in model.parameters() if p.grad is not None}
        seen["moments"] = {v.dtype for s in self.optimizer.state.values() for v in s.values()
                           if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0}
        return loss

    monkeypatch.setattr(DistillTrainer, "training_step", training_step)
    assert main(["distill", "--config", str(config("master"))]) == 0
    assert seen["params"] == seen["grads"] == {torch.float32}
    assert seen["moments"] in (set(), {torch.float32})  # after the first step: AdamW moments in float32
    bf16 = _assert_finite(root / "master")
    assert main(["distill", "--config", str(config("master-fp32", training={"bf16": False}))]) == 0
    fp32 = _logs(root / "master-fp32")
    for a, b in zip(bf16, fp32):
        for k in ("loss", "loss_ce", "loss_kd", "loss_dsa", "loss_hid"):
            assert a[k] == pytest.approx(b[k], rel=0.05, abs=1e-3), (k, a[k], b[k])  # bf16 rounding, not garbage
        assert a["loss"] != b["loss"]  # ... but really another precision
    # the weights moved, and by about as much as in float32 (updates are not lost to rounding)
    w16, w32 = load_file(root / "master/student/model.safetensors"), load_file(root / "master-fp32/student/model.safetensors")
    for k in w16:
        assert w16[k].dtype == torch.float32
        torch.testing.assert_close(w16[k], w32[k], rtol=0, atol=5e-3)


@needs_spacy
def test_lora_student_in_bf16_with_a_bf16_frozen_base(setup, spy_precision):
    root, config = setup
    assert main(["distill", "--config", str(config(
        "lora", student={"dtype": "bfloat16", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}))]) == 0
    _assert_finite(root / "lora")
    assert spy_precision["projector_out"] == {torch.float32}
    adapter = load_file(root / "lora" / "checkpoint-2" / "adapter_model.safetensors")
    assert adapter and {v.dtype for v in adapter.values()} == {torch.float32}  # peft keeps adapters in float32
    exported = load_file(root / "lora" / "student" / "model.safetensors")  # merged into the bf16 base
    assert {v.dtype for v in exported.values()} == {torch.bfloat16}


@needs_spacy
@pytest.mark.parametrize("chunk_size", [0, 5], ids=["unchunked", "chunked"])
def test_bf16_from_a_bf16_teacher_cache(setup, chunk_size, spy_precision):
    root, config = setup
    cache = root / "cache"
    if not (cache / "manifest.json").is_file():
        assert main(["cache-teacher", "--config", str(config("cache-src")), "--out", str(cache), "--top-k", "8",
                     "--dtype", "bfloat16"]) == 0
    name = f"cached-{chunk_size}"
    assert main(["distill", "--config", str(config(name, objective={"chunk_size": chunk_size})),
                 f"teacher.cache={cache}"]) == 0
    _assert_finite(root / name)
    assert spy_precision["mta_dtypes"] == {torch.float32}


@needs_spacy
@pytest.mark.parametrize("chunk_size", [0, 7])
def test_bf16_chunked_and_unchunked_losses_agree(setup, chunk_size):
    """The chunked loss (fused heads, gradients in the forward pass) in bf16 is the unchunked one up to bf16
    rounding of the head matmul."""
    root, config = setup
    name = f"chunk-{chunk_size}"
    assert main(["distill", "--config", str(config(name, objective={"chunk_size": chunk_size}))]) == 0
    ref = root / "chunk-0"
    if chunk_size:
        for a, b in zip(_assert_finite(root / name), _logs(ref)):
            for k in ("loss", "loss_ce", "loss_kd"):
                assert a[k] == pytest.approx(b[k], rel=2e-2), (k, a[k], b[k])


# ------------------------------------------------------------------------------------------- resume, fp16
@needs_spacy
def test_bf16_run_resumes_like_an_uninterrupted_one(setup):
    """2 steps with a checkpoint after each; the last is deleted and the run resumed: same logs and weights."""
    root, config = setup
    name = "resume-bf16"
    cfg = config(name, training={"save_steps": 1, "save_total_limit": None})
    assert main(["distill", "--config", str(cfg)]) == 0
    full = _assert_finite(root / name)
    want = load_file(root / name / "checkpoint-2" / "model.safetensors")
    shutil.rmtree(root / name / "checkpoint-2")
    assert main(["distill", "--config", str(cfg), "--resume"]) == 0
    resumed = _logs(root / name)
    assert resumed[-1]["step"] == 2
    assert resumed[-1]["loss"] == pytest.approx(full[-1]["loss"], rel=1e-6)
    got = load_file(root / name / "checkpoint-2" / "model.safetensors")
    for k in want:
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-7)


@needs_spacy
def test_a_bf16_teacher_with_fused_heads_under_bf16(setup, spy_precision):
    """``teacher.dtype: bfloat16`` (what docs/scaling.md advises) with ``training.bf16``: accelerate returns the
    teacher's hidden states in float32 while its LM head holds bf16 weights; the fused chunked loss applies the head
    to rows cast to its dtype (a dtype error at the first batch otherwise)."""
    root, config = setup
    assert main(["distill", "--config", str(config("bf16-teacher", teacher={"dtype": "bfloat16"},
                                                    objective={"chunk_size": 7}))]) == 0
    _assert_finite(root / "bf16-teacher")
    assert spy_precision["mta_dtypes"] == {torch.float32}


def test_liger_path_takes_a_bf16_teacher_head_with_float32_rows(monkeypatch):
    """The Liger path (stand-in kernels of tests/test_fused_kernel.py) with accelerate's float32 hidden states and a
    bf16 teacher head: rows are cast to each head's dtype (a dtype error in the kernel's matmul otherwise), and the
    loss is the chunked path's up to bf16 rounding."""
    from mtakd.config import ObjectiveConfig
    from mtakd.objectives import fused
    from mtakd.objectives.base import HiddenHead
    from tests.test_fused_kernel import RefCE, RefJSD, make_labels, make_sides

    monkeypatch.setattr(fused, "liger_kernels", lambda: fused.LigerKernels(RefJSD, RefCE))
    monkeypatch.setattr(fused, "DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    losses = {}
    for kernel in ("none", "liger"):
        hidden, head, t_hidden, t_head = make_sides()
        hidden = hidden.detach().float().requires_grad_()
        head, t_head = head.float(), t_head.bfloat16()
        obj = OBJECTIVES["js"](ObjectiveConfig(base="js", fused_kernel=kernel, chunk_size=4))
        loss = obj.base_loss(HiddenHead(hidden, head), HiddenHead(t_hidden.float(), t_head), make_labels())[0]
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(hidden.grad).all()
        losses[kernel] = float(loss)
    assert losses["liger"] == pytest.approx(losses["none"], rel=2e-2)


def test_fp16_on_cpu_is_refused_because_accelerate_would_train_in_float32(setup, capsys):
    """accelerate (1.16) turns fp16 off on the CPU (no autocast, no scaler: ``native_amp`` False), while bf16 is CPU
    autocast; a ``training.fp16`` run without a GPU would silently be a float32 run, so mtakd stops it."""
    import subprocess
    import sys

    probe = "from accelerate import Accelerator; a = Accelerator(cpu=True, mixed_precision='fp16'); print(a.native_amp, a.scaler)"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert proc.stdout.split() == ["False", "None"], proc.stderr[-2000:]  # the documented limit
    root, config = setup
    cfg = config("fp16", training={"bf16": False, "fp16": True})
    assert main(["distill", "--config", str(cfg)]) == 2
    assert "training.fp16 needs a GPU" in capsys.readouterr().err
    assert not (root / "fp16" / "log_history.json").exists()
