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


@pytest.mark.parametrize("pair", PAIRS)
def test_a_preset_alone_carries_the_papers_lambdas(pair):
    """``mta.preset`` fills λ_DSA / λ_Hid with the paper's values (MTA_SPEC §1); an explicit λ wins, also when it
    equals the default, and the paper configs (which write their map and λ out) agree with the preset."""
    from mtakd.config import ConfigError, MTAConfig

    preset, lambdas = PAIRS[pair][4], PAIRS[pair][3]
    assert (PRESETS[preset]["lambda_dsa"], PRESETS[preset]["lambda_hid"]) == lambdas
    cfg = MTAConfig(preset=preset)
    assert (cfg.lambda_dsa, cfg.lambda_hid) == lambdas
    given = MTAConfig(preset=preset, lambda_dsa=2.0)  # an explicit λ_DSA, even at the default value, wins
    assert (given.lambda_dsa, given.lambda_hid) == (2.0, lambdas[1])  # ... and λ_Hid still follows the preset
    assert MTAConfig(preset=preset, lambda_hid=0.0).lambda_hid == 0.0  # the L_DSA-only ablation
    for base in BASES:  # and through the config loader, with a CLI override
        path = PAPER / _name(pair, base, True)
        mta = load_config(path).objective.mta
        assert (mta.lambda_dsa, mta.lambda_hid) == lambdas
        assert resolve_key_layers(mta, None, None) == PRESETS[preset]["layers"]
        assert load_config(path, ["objective.mta.lambda_dsa=7"]).objective.mta.lambda_dsa == 7.0
    with pytest.raises(ConfigError, match="lambda_dsa"):  # a bad explicit λ is still validated
        load_config(PAPER / _name(pair, "fdd", True), ["objective.mta.lambda_dsa=-1"])


def test_opt_preset_from_the_config_loader(tmp_path):
    from mtakd.config import MTAConfig

    cfg = tmp_path / "c.yaml"
    cfg.write_text("teacher: {path: t}\nstudent: {path: s}\ndata: {train: x.jsonl}\nobjective: {mta: {preset: opt}}\n")
    mta = load_config(cfg).objective.mta
    assert (mta.lambda_dsa, mta.lambda_hid) == (3.0, 0.3)
    assert load_config(cfg, ["objective.mta.lambda_hid=0.1"]).objective.mta.lambda_hid == 0.1
    assert load_config(cfg, ["objective.mta.preset=null"]).objective.mta.lambda_dsa == 2.0  # no preset: the default
    m = MTAConfig(preset="opt")  # a preset changed later: the unset λ follow it, an explicit one stays
    m.preset = "gpt2"
    assert (m.lambda_dsa, m.lambda_hid) == (2.0, 0.2)
    m.lambda_dsa = 5.0
    m.preset = "opt"
    assert (m.lambda_dsa, m.lambda_hid) == (5.0, 0.3)
    assert MTAConfig(preset="smollm2-10").lambda_dsa == 2.0  # not a paper pair: the defaults
