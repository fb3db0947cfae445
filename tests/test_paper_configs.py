"""configs/paper/: the paper's three pairs × (FDD, DistiLLM, DistiLLM-2) × (without, with MTA) + a teacher-SFT
config per pair validate offline, carry the paper's hyper-parameters (MTA_SPEC §8) and layer maps (§2), and
`mtakd distill --dry-run` prints the resolved map without reaching the hub."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import asdict

import pytest

from mtakd.config import load_config
from mtakd.mta.layers import PRESETS, resolve_key_layers
from tests.conftest import REPO

PAPER = REPO / "configs" / "paper"
PAIRS = {  # name: (teacher hub id, student hub id, lr, (λ_DSA, λ_Hid), preset, LoRA)
    "gpt2": ("gpt2-xl", "gpt2", 1e-4, (2.0, 0.2), "gpt2", None),
    "qwen1.5": ("Qwen/Qwen1.5-1.8B", "Qwen/Qwen1.5-0.5B", 1e-4, (2.0, 0.2), "qwen1.5", None),
    "opt": ("facebook/opt-6.7b", "facebook/opt-1.3b", 5e-4, (3.0, 0.3), "opt", (256, 8, 0.1)),
}
BASES = ("fdd", "distillm", "distillm2")
DISTILL = [(pair, base, mta) for pair in PAIRS for base in BASES for mta in (False, True)]
DOLLY = "databricks/databricks-dolly-15k"


def _name(pair, base, mta):
    return f"{pair}-{base}{'-mta' if mta else ''}.yaml"


def test_the_paper_grid_is_complete():
    expected = {_name(*c) for c in DISTILL} | {f"{pair}-teacher-sft.yaml" for pair in PAIRS}
    assert {p.name for p in PAPER.glob("*.yaml")} == expected


@pytest.mark.parametrize("pair,base,mta", DISTILL, ids=[_name(*c)[:-5] for c in DISTILL])
def test_distillation_config_has_the_paper_settings(pair, base, mta):
    teacher, student, lr, lambdas, preset, lora = PAIRS[pair]
    path = PAPER / _name(pair, base, mta)
    text = path.read_text()
    cfg = load_config(path)
    launcher = "configs/accelerate/deepspeed_zero3.yaml" if pair == "opt" else "configs/accelerate/deepspeed_zero2.yaml"
    assert f"accelerate launch --config_file {launcher}" in text and f"configs/paper/{path.name}" in text
    assert (REPO / launcher).is_file()
    assert cfg.teacher.path == f"runs/paper/{pair}-teacher-sft/student" and teacher in text  # the SFT'd teacher
    assert cfg.student.path == student
    assert (cfg.student.lora is None) == (lora is None)
    if lora:
        assert (cfg.student.lora.r, cfg.student.lora.alpha, cfg.student.lora.dropout) == lora
    t = cfg.training
    assert t.learning_rate == lr and t.num_train_epochs == 5 and t.lr_scheduler_type == "cosine" and t.bf16
    assert t.per_device_train_batch_size * t.gradient_accumulation_steps * 4 == 16  # with the 4 processes launched
    assert cfg.data.template == "alpaca" and cfg.data.validation_size == 500
    assert cfg.data.train == ([f"runs/paper/{pair}-dolly-pairs.jsonl"] if base == "distillm2" else [DOLLY])
    if base == "distillm2":
        assert "mtakd generate" in text and "--field student_output" in text and DOLLY in text
    o = cfg.objective
    assert o.base == base and o.skew_alpha == 0.1
    if base == "distillm":
        assert t.extra_args.get("eval_on_start") and o.options["capacity"] == 1000 and o.options["student_generation"]
    assert o.mta_enabled == mta
    if mta:
        assert (o.mta.lambda_dsa, o.mta.lambda_hid) == lambdas
        assert o.mta.key_layers is not None  # written out explicitly, not via the preset
        n_student, n_teacher = PRESETS[preset]["n"]
        for counts in ((None, None), (n_student, n_teacher)):  # offline (unknown counts) and with the real ones
            assert resolve_key_layers(o.mta, *counts) == PRESETS[preset]["layers"]


@pytest.mark.parametrize("pair", PAIRS)
def test_teacher_sft_config(pair):
    teacher = PAIRS[pair][0]
    cfg = load_config(PAPER / f"{pair}-teacher-sft.yaml")
    assert cfg.objective.base == "sft" and not cfg.objective.mta_enabled
    assert cfg.student.path == teacher and cfg.training.output_dir == f"runs/paper/{pair}-teacher-sft"
    t = cfg.training
    assert (t.learning_rate, t.num_train_epochs, t.lr_scheduler_type, t.bf16) == (5e-5, 10, "cosine", True)
    assert cfg.data.train == [DOLLY] and cfg.data.template == "alpaca"


def test_dry_run_works_offline_and_prints_the_map(monkeypatch):
    """Every paper config, with the hub unreachable (offline mode): exit 0 and the paper's map printed."""
    import huggingface_hub.constants

    from mtakd.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for path in sorted(PAPER.glob("*.yaml")):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["distill", "--config", str(path), "--dry-run"]) == 0, path.name
        resolved = json.loads(buf.getvalue())["resolved"]
        if path.stem.endswith("-mta"):
            preset = PAIRS[path.stem.split("-")[0]][4]
            assert resolved["mta_key_layers"] == [asdict(k) for k in PRESETS[preset]["layers"]], path.name
        else:
            assert "mta_key_layers" not in resolved
