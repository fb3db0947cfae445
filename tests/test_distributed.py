"""Data parallelism: `accelerate launch` with 2 CPU processes (DDP over gloo) trains like one process with the
same global batch, and MTA's spans, importance weights and DSA stay per-sequence under a split batch.

Why the comparison is exact in maths: every loss term is a mean over one micro-batch (token mean for the base
objective, sequence mean for MTA); the Trainer divides by the accumulation steps and DDP averages gradients over
processes, so one step optimises the mean of the micro-batch means. With equal-length sequences (every example
cut to 24 prompt + 24 response tokens) each micro-batch holds the same number of response tokens, and that mean
of means *is* the loss of the whole global batch. What remains is float32 rounding: gloo sums two gradient
halves and the losses are averaged in a different order than one 4-row matmul does, ~1e-7 relative per
operation, which three AdamW steps keep below 1e-6. We assert rel 1e-5 (loss and every component, grad norm) and
atol 1e-6 on the final weights; any real fault (a rank seeing other data, a factor 2 in the GA/DP normalisation,
unsynchronised projectors, a per-batch rather than per-sequence MTA reduction) moves them by more than 1e-3.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mtakd.cli import main
from tests.conftest import REPO, needs_spacy, write_tiny_run_config

COMPARED = ("loss", "grad_norm", "learning_rate", "loss_base", "loss_ce", "loss_kd", "loss_dsa", "loss_hid", "epoch")
REL = 1e-5


def _train_logs(run):
    return [h for h in json.loads((run / "log_history.json").read_text()) if "loss" in h]


def _assert_same_run(got, want):
    g, w = _train_logs(got), _train_logs(want)
    assert [h["step"] for h in g] == [h["step"] for h in w] == [1, 2, 3]
    for a, b in zip(g, w):
        for k in COMPARED:
            assert a[k] == pytest.approx(b[k], rel=REL, abs=1e-9), (k, a["step"], a[k], b[k])
    for name in ("student/model.safetensors", "mta_projectors.safetensors"):
        ta, tb = load_file(got / name), load_file(want / name)
        assert set(ta) == set(tb)
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=1e-6, msg=f"{name}:{k}")


# ------------------------------------------------------------------------ per-sequence MTA (unit)
def _padded_batch(lengths, t, seed=0):
    """Random hidden states (garbage at padding), masks and word/phrase spans for sequences of ``lengths``."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    mask = torch.zeros(b, t, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    s_hidden = tuple(torch.randn(b, t, 16, generator=g, dtype=torch.float64) for _ in range(3))
    t_hidden = tuple(torch.randn(b, t, 32, generator=g, dtype=torch.float64) for _ in range(5))
    spans = {}
    for gran, k in (("word", 4), ("phrase", 3)):
        member = torch.zeros(b, k, t, dtype=torch.bool)
        for i, n in enumerate(lengths):
            for j in range(k - i % 2):  # sequences with different numbers of spans: K is padded per batch
                a = int(torch.randint(0, n - 1, (1,), generator=g))
                member[i, j, a : min(n, a + 1 + j)] = True
        spans[f"{gran}_spans"] = member
    return s_hidden, t_hidden, mask, spans


def _rows(batch, rows, t):
    s, te, mask, spans = batch
    return (tuple(h[rows, :t] for h in s), tuple(h[rows, :t] for h in te), mask[rows, :t],
            {k: v[rows, :, :t] for k, v in spans.items()})


def test_mta_terms_are_per_sequence_so_a_split_batch_averages_to_the_full_batch():
    from mtakd.config import MTAConfig
    from mtakd.mta import MTALoss
    from mtakd.mta.layers import KeyLayer

    keys = [KeyLayer(student=1, teacher=2, granularity="word"), KeyLayer(student=2, teacher=4, granularity="phrase")]
    mta = MTALoss(MTAConfig(), keys)
    projectors = mta.build_projectors(16, 32, from_teacher=False).double()
    full = _padded_batch([9, 5, 7, 3], t=9)
    whole = mta(*full, projectors)
    # what two ranks see: halves, each padded only to its own longest sequence (9 and 7), spans as collated
    first = mta(*_rows(full, slice(0, 2), 9), projectors)
    second = mta(*_rows(full, slice(2, 4), 7), projectors)
    for k in ("dsa", "hid"):
        torch.testing.assert_close((first[k] + second[k]) / 2, whole[k], rtol=1e-12, atol=1e-14)
    # and one sequence alone gives its own share: nothing leaks between sequences of a batch
    alone = [mta(*_rows(full, slice(i, i + 1), n), projectors) for i, n in enumerate([9, 5, 7, 3])]
    torch.testing.assert_close(sum(a["dsa"] for a in alone) / 4, whole["dsa"], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------- end to end runs
@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, tiny_teacher_dir, tiny_narrow_student_dir, equal_length_jsonl):
    root = tmp_path_factory.mktemp("distributed")
    spans = root / "spans"

    def config(name, **training):
        return write_tiny_run_config(root / f"{name}.yaml", tiny_teacher_dir, tiny_narrow_student_dir,
                                     equal_length_jsonl, root / name, spans, training=training)

    return root, config


@pytest.fixture(scope="module")
def single_process_run(tiny_setup):
    """One process, global batch 4 in one micro-batch: the reference."""
    root, config = tiny_setup
    assert main(["distill", "--config", str(config("single"))]) == 0
    run = root / "single"
    stats = json.loads((run / "mtakd_run.json").read_text())["data_stats"]
    # the premise of an exact comparison: every sequence is cut to the same prompt and response lengths
    assert stats["records"] == stats["prompt_truncated"] == stats["response_truncated"] == 16
    return run


@needs_spacy
def test_gradient_accumulation_matches_one_big_batch(tiny_setup, single_process_run):
    """2 micro-batches of 2 accumulated = 1 batch of 4 (the Trainer divides our per-micro-batch means by 2)."""
    root, config = tiny_setup
    assert main(["distill", "--config", str(config("accum", per_device_train_batch_size=2,
                                                    gradient_accumulation_steps=2))]) == 0
    _assert_same_run(root / "accum", single_process_run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_spacy
def test_two_cpu_processes_match_one_process_with_the_same_global_batch(tiny_setup, single_process_run):
    root, config = tiny_setup
    cfg = config("ddp", per_device_train_batch_size=2)  # 2 processes x 2 = global batch 4
    # `accelerate launch --cpu` only starts several processes through mpirun; --multi_gpu starts them with
    # torchrun, and mtakd switches to CPU/gloo itself when the machine has no GPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "mtakd.cli", "distill", "--config", str(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = root / "ddp"
    # really data-parallel: 16 examples / (2 processes x 2) = 4 steps per epoch, as for the single process
    assert [h["epoch"] for h in _train_logs(run)] == [0.25, 0.5, 0.75]
    _assert_same_run(run, single_process_run)
    assert not list(run.glob("tmp-checkpoint-*"))
