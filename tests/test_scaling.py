"""Scaling out without a GPU: a data-parallel teacher cache (2 CPU processes write the same files as one), FSDP's
wrapping of the student, its projectors and the teacher, the GPU acceptance script's refusal without CUDA, and a
teacher spread over devices (``teacher.device_map``)."""

import json
import os
import subprocess
import sys

import pytest

from mtakd.cli import main
from tests.conftest import REPO, needs_spacy, write_tiny_run_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _launch(n: int, *argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``python -m mtakd.cli ARGV`` with ``n`` processes (CPU/gloo on a machine without GPUs)."""
    from tests.test_distributed import _free_port

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "mtakd.cli", *argv]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------------- data-parallel cache
def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.safetensors"))}


def _manifest(d):
    m = json.loads((d / "manifest.json").read_text())
    m.pop("build_seconds")
    return m


@needs_spacy
def test_two_processes_build_the_single_process_cache_byte_for_byte_and_resume(
        tmp_path, tiny_teacher_dir, tiny_narrow_student_dir, equal_length_jsonl):
    cfg = write_tiny_run_config(tmp_path / "run.yaml", tiny_teacher_dir, tiny_narrow_student_dir, equal_length_jsonl,
                                tmp_path / "run", tmp_path / "spans", data={"validation_size": 3})
    argv = ["cache-teacher", "--config", str(cfg), "--top-k", "6", "--shard-size", "4", "--batch-size", "3"]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    one = _files(tmp_path / "one")
    # 13 train examples in 4 shards, 3 validation examples in 1: process 0 writes shards 0, 2, 4, process 1 1, 3
    assert sorted(one) == [f"train-0000{i}.safetensors" for i in range(4)] + ["validation-00000.safetensors"]

    two = tmp_path / "two"
    proc = _launch(2, *argv, "--out", str(two))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("teacher cache written to") == 1
    assert _files(two) == one  # the same bytes: shards do not depend on which process computed them
    assert _manifest(two) == _manifest(tmp_path / "one")
    assert _manifest(two)["complete"] and not list(two.glob("*.tmp"))

    # a crash: one shard of each process lost, the manifest still incomplete; the same command finishes it
    manifest = json.loads((two / "manifest.json").read_text())
    (two / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    for name in ("train-00001.safetensors", "validation-00000.safetensors"):
        (two / name).unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in two.glob("*.safetensors")}
    proc = _launch(2, *argv, "--out", str(two))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert {p.name: p.stat().st_mtime_ns for p in two.glob("*.safetensors") if p.name in kept} == kept  # kept
    assert _files(two) == one and _manifest(two) == _manifest(tmp_path / "one")


def test_shards_are_numbered_over_both_splits():
    from mtakd.teacher_cache import _shards

    assert _shards({"train": 9, "validation": 3}, 4) == [
        ("train", 0, 0, 4), ("train", 1, 4, 8), ("train", 2, 8, 9), ("validation", 0, 0, 3)]
    assert _shards({"train": 0, "validation": 0}, 4) == []


# ------------------------------------------------------------------------------------ GPU acceptance
GPU_CHECK = REPO / "benchmarks" / "gpu_check.py"


def test_gpu_check_refuses_without_cuda():
    proc = subprocess.run([sys.executable, str(GPU_CHECK), "--steps", "1"], cwd=REPO,
                          env={**ENV, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr
    assert "no CUDA GPU is visible" in proc.stderr and not proc.stdout


def test_gpu_check_plans_every_configuration(tmp_path):
    sys.path.insert(0, str(GPU_CHECK.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(GPU_CHECK.parent))
    specs = gpu_check.build_plan("c.yaml", tmp_path, 3, 4)
    assert list(specs) == ["single-bf16", "single-unchunked", "liger", "teacher-cache", "ddp", "fsdp", "zero2", "zero3"]
    for name, spec in specs.items():
        assert "training.bf16=true" in spec["argv"] and "training.max_steps=3" in spec["argv"], name
        if "--config_file" in spec["launch"]:
            assert (REPO / spec["launch"][spec["launch"].index("--config_file") + 1]).is_file()
            assert spec["launch"][-1] == "4"  # every GPU
    assert "objective.chunk_size=0" in specs["single-unchunked"]["argv"]
    assert "objective.fused_kernel=liger" in specs["liger"]["argv"]
    assert specs["teacher-cache"]["before_argv"][0] == "cache-teacher"
    assert any(a.startswith("teacher.cache=") for a in specs["teacher-cache"]["argv"])
    # the table
    text = gpu_check.table([{"configuration": "ddp", "status": "ok", "s/step": 0.5, "peak GB": 3.25, "tokens/s": 1234.4,
                             "note": ""}, {"configuration": "zero3", "status": "skipped", "note": "deepspeed is not "
                             "installed"}])
    lines = text.splitlines()
    assert lines[0].split() == ["configuration", "status", "s/step", "peak", "GB", "tokens/s", "note"]
    assert lines[2].split() == ["ddp", "ok", "0.500", "3.25", "1234"]
    assert lines[3].split()[:5] == ["zero3", "skipped", "-", "-", "-"]


@needs_spacy
def test_gpu_check_child_measures_a_run_on_cpu(tmp_path, tiny_teacher_dir, tiny_narrow_student_dir,
                                               equal_length_jsonl):
    """What each launched process reports (tokens; peak GPU memory, 0 on CPU) and the row built from it."""
    cfg = write_tiny_run_config(tmp_path / "run.yaml", tiny_teacher_dir, tiny_narrow_student_dir, equal_length_jsonl,
                                tmp_path / "run", tmp_path / "spans", training={"max_steps": 2})
    report = tmp_path / "report"
    report.mkdir()
    proc = subprocess.run([sys.executable, str(GPU_CHECK), "--child", str(report), "distill", "--config", str(cfg)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((report / "rank0.json").read_text()) == {"tokens": 2 * 4 * 48, "peak_bytes": 0}
    sys.path.insert(0, str(GPU_CHECK.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(GPU_CHECK.parent))
    row = gpu_check.measurements(tmp_path / "run", report)
    assert row["s/step"] > 0 and row["peak GB"] == 0 and row["tokens/s"] > 0


# ------------------------------------------------------------------------------------------------- FSDP
ACCELERATE_FSDP_PROBE = """
import sys
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin
acc = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
with open(f"{sys.argv[1]}.{acc.state.process_index}", "w") as fh:
    fh.write(f"{acc.state.process_index} {acc.state.distributed_type.value} {acc.is_fsdp2}")
"""


def test_accelerate_does_not_run_fsdp_on_cpu_processes(tmp_path):
    """The documented limit (docs/scaling.md, "FSDP"): accelerate only turns multi-accelerator process groups
    (MULTI_GPU, MULTI_XPU, ...) into FSDP; 2 CPU processes with an FSDP plugin stay MULTI_CPU (DDP). When this test
    fails, accelerate has started to support FSDP on CPU and mtakd's refusal can go."""
    from tests.test_distributed import _free_port

    script = tmp_path / "probe.py"
    script.write_text(ACCELERATE_FSDP_PROBE)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_free_port()), str(script), str(tmp_path / "result")], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [(tmp_path / f"result.{rank}").read_text().split() for rank in (0, 1)]
    assert results == [["0", "MULTI_CPU", "False"], ["1", "MULTI_CPU", "False"]]


def test_an_fsdp_launch_without_gpus_is_refused_not_silently_ddp(monkeypatch):
    import mtakd.run as d
    from mtakd.config import ConfigError

    monkeypatch.setattr(d, "_has_accelerator", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    with pytest.raises(ConfigError, match="FSDP needs GPUs.*silently be DDP"):
        d._cpu_processes()
    assert "ACCELERATE_USE_CPU" not in os.environ
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")  # plain multi-process CPU runs: DDP over gloo, as before
    d._cpu_processes()
    assert os.environ["ACCELERATE_USE_CPU"] == "true"


# ------------------------------------------------------------------------------------------ large teachers
@needs_spacy
def test_teacher_device_map_auto_trains_like_a_placed_teacher(tmp_path, tiny_teacher_dir, tiny_narrow_student_dir,
                                                              equal_length_jsonl, monkeypatch):
    """``teacher.device_map: auto`` loads the teacher through transformers' device map (on this machine everything
    lands on the CPU, where transformers sets no ``hf_device_map`` and the trainer places it as usual) and the run
    equals the usual one. Spread over several GPUs, the trainer leaves it where it is (unit test below)."""
    from transformers import AutoModelForCausalLM

    seen = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        seen.append(kwargs.get("device_map"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(from_pretrained))

    def run(name, **teacher):
        cfg = write_tiny_run_config(tmp_path / f"{name}.yaml", tiny_teacher_dir, tiny_narrow_student_dir,
                                    equal_length_jsonl, tmp_path / name, tmp_path / "spans",
                                    teacher=teacher, training={"max_steps": 2}, data={"max_samples": 8})
        assert main(["distill", "--config", str(cfg)]) == 0
        return [h for h in json.loads((tmp_path / name / "log_history.json").read_text()) if "loss" in h]

    mapped, placed = run("mapped", device_map="auto"), run("placed")
    assert seen == ["auto", None, None, None]  # (teacher, student) of each run
    for a, b in zip(mapped, placed):
        for k in ("loss", "loss_kd", "loss_dsa", "loss_hid", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-6), k


def test_device_map_outputs_are_gathered_on_the_batch_device_and_multi_process_is_refused(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import torch

    import mtakd.distill as d
    from mtakd.config import ConfigError, build_config
    from mtakd.trainer import _on_device, _spread

    assert _spread(SimpleNamespace(hf_device_map={"model.embed": 0, "model.layers.9": 1, "lm_head": "cpu"}))
    assert not _spread(SimpleNamespace(hf_device_map={"": "cpu"})) and not _spread(torch.nn.Linear(1, 1))
    out = _on_device(SimpleNamespace(logits=torch.ones(1, 2, 3), hidden_states=(torch.ones(1, 2, 4),) * 3),
                     torch.device("meta"))
    assert out.logits.is_meta and all(h.is_meta for h in out.hidden_states)

    base = {"student": {"path": "s"}, "data": {"train": ["x.jsonl"]}}
    with pytest.raises(ValueError, match="does not apply to random_init"):
        build_config({**base, "teacher": {"path": "t", "random_init": True, "device_map": "auto"}})
    cfg = build_config({**base, "teacher": {"path": "t", "device_map": "auto"},
                        "training": {"output_dir": str(tmp_path / "run")}})
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    with pytest.raises(ConfigError, match="teacher.device_map spreads the teacher over the devices of one process"):
        d.distill(cfg)


FSDP_YAML = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
  fsdp_offload_params: false
  fsdp_activation_checkpointing: false
num_machines: 1
machine_rank: 0
num_processes: 2
mixed_precision: 'no'
rdzv_backend: static
same_network: true
main_training_function: main
use_cpu: false
"""


@needs_spacy
def test_fsdp2_on_two_cpu_processes_matches_one_process(tmp_path, tiny_teacher_dir, tiny_narrow_student_dir,
                                                        equal_length_jsonl):
    """configs/accelerate/fsdp.yaml's FSDP2 settings on 2 CPU processes (through tests/fsdp_cpu_shim.py, see there):
    the student and its MTA projectors are sharded (DTensor parameters), the projectors keep their own optimiser group,
    the teacher is a full frozen replica outside the optimiser, the LM heads are not fused; 2 processes × 2 sequences
    give the loss, every component, the gradient norms and the exported weights (FULL_STATE_DICT, projectors moved to
    mta_projectors.safetensors) of 1 process × 4, as DDP does (tests/test_distributed.py)."""
    from tests.test_distributed import _assert_same_run, _free_port

    def config(name, **training):
        return write_tiny_run_config(tmp_path / f"{name}.yaml", tiny_teacher_dir, tiny_narrow_student_dir,
                                     equal_length_jsonl, tmp_path / name, tmp_path / "spans", training=training)

    assert main(["distill", "--config", str(config("single"))]) == 0
    (tmp_path / "accelerate-fsdp.yaml").write_text(FSDP_YAML)
    probe = tmp_path / "probe"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "accelerate-fsdp.yaml"),
           "--main_process_port", str(_free_port()), str(REPO / "tests" / "fsdp_cpu_shim.py"),
           "distill", "--config", str(config("fsdp", per_device_train_batch_size=2))]
    proc = subprocess.run(cmd, cwd=REPO, env={**ENV, "MTAKD_FSDP_PROBE": str(probe), "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        info = json.loads((tmp_path / f"probe.rank{rank}.json").read_text())
        assert info == {"distributed_type": "FSDP", "fsdp": True, "student_dtensor": True, "projectors_dtensor": True,
                        "teacher_dtensor": False, "teacher_trainable": False, "teacher_in_optimizer": False,
                        "projector_group": {"lr": 5e-4, "weight_decay": 0.0, "same_params": True},
                        "fused_heads": False}, rank
    _assert_same_run(tmp_path / "fsdp", tmp_path / "single")
