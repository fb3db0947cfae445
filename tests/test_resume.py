"""Exact resume and atomic checkpoints.

A run of 6 steps (checkpoints every 3, 4 steps per epoch, attention dropout on) is killed right after its
checkpoint at step 3 and resumed with ``mtakd distill --resume``: it must end with bit-identical student
weights, projectors and per-step loss log as the uninterrupted run (optimizer, scheduler, RNG, data order
across the epoch boundary, projectors). A kill *during* a checkpoint save leaves only ``tmp-checkpoint-N``,
which resume ignores.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from mtakd.cli import main
from mtakd.trainer import DistillTrainer
from tests.conftest import EXAMPLES, needs_spacy, tiny_llama, write_tiny_run_config

pytestmark = needs_spacy
STEPS, SAVE = 6, 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_teacher_dir, tiny_tokenizer):
    root = tmp_path_factory.mktemp("resume")
    student = root / "student_with_dropout"  # dropout makes the RNG state part of what must be restored
    model = tiny_llama(len(tiny_tokenizer), layers=2, hidden=16, seed=3)
    model.config.attention_dropout = 0.1
    model.save_pretrained(student)
    tiny_tokenizer.save_pretrained(student)

    def config(name):
        return write_tiny_run_config(
            root / f"{name}.yaml", tiny_teacher_dir, student, EXAMPLES / "demo.jsonl", root / name, root / "spans",
            data={"max_samples": 8, "max_prompt_length": 24, "max_length": 40},
            training={"max_steps": STEPS, "save_steps": SAVE, "per_device_train_batch_size": 2,
                      "warmup_steps": 1, "save_total_limit": None},
        )

    return root, config


@pytest.fixture(scope="module")
def uninterrupted(setup):
    root, config = setup
    assert main(["distill", "--config", str(config("full"))]) == 0
    return root / "full"


class _KillAfterSave(TrainerCallback):
    """A kill right after the checkpoint of ``step`` is complete (what SIGINT/SIGKILL would do there)."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def _with_callback(monkeypatch, callback):
    init = DistillTrainer.__init__

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(callback)

    monkeypatch.setattr(DistillTrainer, "__init__", patched)


def _step_logs(run):
    logs = [h for h in json.loads((run / "log_history.json").read_text()) if "loss" in h]
    assert [h["step"] for h in logs] == list(range(1, STEPS + 1))
    return logs


def _assert_identical(run, reference):
    assert _step_logs(run) == _step_logs(reference)  # every loss component, grad norm, lr, epoch: bit for bit
    for name in ("student/model.safetensors", "mta_projectors.safetensors"):
        got, want = load_file(run / name), load_file(reference / name)
        assert set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) for k in got), name


def test_killed_after_half_the_steps_and_resumed_ends_identical(setup, uninterrupted, monkeypatch):
    root, config = setup
    cfg = str(config("killed"))
    run = root / "killed"
    with monkeypatch.context() as m:
        _with_callback(m, _KillAfterSave(SAVE))
        assert main(["distill", "--config", cfg]) == 130  # interrupted
    assert get_last_checkpoint(str(run)) == str(run / f"checkpoint-{SAVE}")
    assert not (run / "student").exists() and not (run / "log_history.json").exists()
    ckpt = load_file(run / f"checkpoint-{SAVE}" / "model.safetensors")
    assert any(k.startswith("mta_projectors.") for k in ckpt)  # checkpoints carry the projectors
    assert main(["distill", "--config", cfg, "--resume"]) == 0
    _assert_identical(run, uninterrupted)
    info = json.loads((run / "mtakd_run.json").read_text())
    assert info["data_stats"]["records"] == 8 and {"torch", "transformers", "accelerate"} <= set(info["versions"])


def test_a_kill_during_a_checkpoint_save_leaves_no_checkpoint_that_looks_valid(setup, uninterrupted, monkeypatch):
    root, config = setup
    cfg = str(config("torn"))
    run = root / "torn"
    save = DistillTrainer._save_optimizer_and_scheduler

    def torn(self, output_dir):  # the weights of checkpoint-6 are written, its optimizer/trainer state not yet
        if self.state.global_step == STEPS:
            raise KeyboardInterrupt
        return save(self, output_dir)

    with monkeypatch.context() as m:
        m.setattr(DistillTrainer, "_save_optimizer_and_scheduler", torn)
        assert main(["distill", "--config", cfg]) == 130
    assert (run / f"tmp-checkpoint-{STEPS}" / f"checkpoint-{STEPS}" / "model.safetensors").exists()
    assert not (run / f"checkpoint-{STEPS}").exists()
    assert get_last_checkpoint(str(run)) == str(run / f"checkpoint-{SAVE}")  # the partial save is invisible
    assert main(["distill", "--config", cfg, "--resume"]) == 0
    assert not list(run.glob("tmp-checkpoint-*"))
    assert sorted(p.name for p in run.glob("checkpoint-*")) == [f"checkpoint-{SAVE}", f"checkpoint-{STEPS}"]
    _assert_identical(run, uninterrupted)


def test_atomic_saves_keep_the_trainers_checkpoint_rotation(setup, tiny_teacher_dir, tiny_narrow_student_dir):
    root, _ = setup
    out = root / "rotated"
    cfg = write_tiny_run_config(root / "rotated.yaml", tiny_teacher_dir, tiny_narrow_student_dir,
                                EXAMPLES / "demo.jsonl", out, root / "spans", data={"max_samples": 8},
                                training={"max_steps": 3, "save_steps": 1, "save_total_limit": 2,
                                          "per_device_train_batch_size": 2})
    assert main(["distill", "--config", str(cfg)]) == 0
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2", "checkpoint-3"]
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3]


def test_lora_student_resumes_its_projectors(setup, monkeypatch):
    """A LoRA checkpoint holds only the adapter: the projectors are saved beside it and restored."""
    root, config = setup

    def lora_config(name):
        path = config(name)
        import yaml

        cfg = yaml.safe_load(path.read_text())
        cfg["student"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
        path.write_text(yaml.safe_dump(cfg))
        return str(path)

    assert main(["distill", "--config", lora_config("lora_full")]) == 0
    killed = lora_config("lora_killed")
    with monkeypatch.context() as m:
        _with_callback(m, _KillAfterSave(SAVE))
        assert main(["distill", "--config", killed]) == 130
    assert (root / "lora_killed" / f"checkpoint-{SAVE}" / "mta_projectors.safetensors").exists()
    assert main(["distill", "--config", killed, "--resume"]) == 0
    _assert_identical(root / "lora_killed", root / "lora_full")


def test_resuming_a_finished_run_trains_no_further_step(uninterrupted, tmp_path):
    import shutil

    run = tmp_path / "finished"
    shutil.copytree(uninterrupted, run)
    info = json.loads((run / "mtakd_run.json").read_text())
    info["training"]["output_dir"] = str(run)
    (run / "mtakd_run.json").write_text(json.dumps(info))
    cfg = tmp_path / "c.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump({k: info[k] for k in ("teacher", "student", "data", "objective", "training")}))
    assert main(["distill", "--config", str(cfg), "--resume"]) == 0
    assert not (run / f"checkpoint-{STEPS + 1}").exists()
    _assert_identical(run, uninterrupted)


def _extension_config(config, name, steps):
    """A constant-LR run whose length is ``steps`` (the schedule does not depend on the run's length)."""
    import yaml

    path = config(name)
    cfg = yaml.safe_load(path.read_text())
    cfg["training"].update(max_steps=steps, save_steps=4, lr_scheduler_type="constant", warmup_steps=0,
                           per_device_train_batch_size=3)  # 3 steps an epoch: step 4 is mid-epoch
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_resume_with_a_larger_max_steps_extends_the_run_like_an_uninterrupted_one(setup, caplog):
    root, config = setup
    assert main(["distill", "--config", _extension_config(config, "long8", 8)]) == 0
    short = _extension_config(config, "ext", 4)
    assert main(["distill", "--config", short]) == 0
    with caplog.at_level("INFO", logger="mtakd.distill"):  # same output dir, longer run; an override after
        assert main(["distill", "--config", short, "--resume", "training.max_steps=8"]) == 0  # --resume is an override
    assert f"resuming from {root / 'ext' / 'checkpoint-4'} (step 4 of 8)" in caplog.text
    assert (root / "ext" / "checkpoint-8").is_dir()
    logs = [h for h in json.loads((root / "ext" / "log_history.json").read_text()) if "loss" in h]
    want = [h for h in json.loads((root / "long8" / "log_history.json").read_text()) if "loss" in h]
    assert [h["step"] for h in logs] == list(range(1, 9))
    for got, ref in zip(logs, want):
        assert {k: v for k, v in got.items() if k != "epoch"} == pytest.approx(
            {k: v for k, v in ref.items() if k != "epoch"}, abs=1e-6)
    for name in ("student/model.safetensors", "mta_projectors.safetensors"):
        got, ref = load_file(root / "ext" / name), load_file(root / "long8" / name)
        assert max((got[k] - ref[k]).abs().max().item() for k in ref) <= 1e-6, name


def test_extending_a_cosine_run_says_the_schedule_is_rebuilt(setup, caplog):
    import yaml

    root, config = setup
    path = config("cos")
    cfg = yaml.safe_load(path.read_text())
    cfg["training"].update(max_steps=2, save_steps=2)
    path.write_text(yaml.safe_dump(cfg))
    assert main(["distill", "--config", str(path)]) == 0
    with caplog.at_level("INFO", logger="mtakd.distill"):
        assert main(["distill", "--config", str(path), "training.max_steps=3", "--resume"]) == 0
    assert "cosine learning-rate schedule is rebuilt for the new length" in caplog.text
    assert [h["step"] for h in json.loads((root / "cos" / "log_history.json").read_text()) if "loss" in h] == [1, 2, 3]


def test_extending_a_finished_cosine_run_trains_the_new_step(uninterrupted, tmp_path):
    """The 6-step cosine run ends at LR 0; extended to 7 steps, step 7 runs at the rebuilt schedule's LR for
    step 7 (before: the optimizer kept the old schedule's final LR 0 and no weight changed)."""
    import shutil

    import yaml

    run = tmp_path / "extended"
    shutil.copytree(uninterrupted, run)
    info = json.loads((run / "mtakd_run.json").read_text())
    info["training"].update(output_dir=str(run), max_steps=STEPS + 1)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({k: info[k] for k in ("teacher", "student", "data", "objective", "training")}))
    assert info["training"]["lr_scheduler_type"] == "cosine"
    assert main(["distill", "--config", str(cfg), "--resume"]) == 0
    before = load_file(run / f"checkpoint-{STEPS}" / "model.safetensors")
    after = load_file(run / "student" / "model.safetensors")
    assert max((after[k] - before[k]).abs().max().item() for k in after) > 1e-5
    projectors = load_file(run / "mta_projectors.safetensors")  # own param group (projector_lr), also rescheduled
    assert any(not torch.equal(v, before[f"mta_projectors.{k}"]) for k, v in projectors.items())


def test_a_refused_resume_names_the_changed_keys_and_both_values(setup, uninterrupted):
    root, config = setup
    with pytest.raises(Exception) as e:
        from tests.conftest import run_subcommand
        import mtakd.distill

        run_subcommand(mtakd.distill, ["distill", "--config", str(config("full")), "objective.mta.lambda_dsa=3.0",
                                       "data.max_length=41", "--resume"])
    assert "objective.mta.lambda_dsa: 2.0 → 3.0" in str(e.value) and "data.max_length: 40 → 41" in str(e.value)
