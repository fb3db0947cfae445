"""What a run prints: the Trainer's log lines with numbers as numbers, no "Writing model shards" bars between
them, and a line saying that a run reads its teacher from a cache."""

import re

import pytest

from mtakd.cli import main
from tests.conftest import EXAMPLES, needs_spacy, write_tiny_run_config

pytestmark = needs_spacy


@pytest.fixture
def config(tmp_path, tiny_teacher_dir, tiny_narrow_student_dir):
    return write_tiny_run_config(tmp_path / "run.yaml", tiny_teacher_dir, tiny_narrow_student_dir,
                                 EXAMPLES / "demo.jsonl", tmp_path / "out", tmp_path / "spans",
                                 data={"max_samples": 8}, training={"max_steps": 2, "save_steps": 1})


def test_the_training_log_shows_numbers_and_no_shard_bars(config, capsys):
    """Before: `{'loss': '7.393', ...}` (strings) and "Writing model shards" bars at every checkpoint and export."""
    assert main(["distill", "--config", str(config)]) == 0
    out = capsys.readouterr()
    printed = out.out + out.err
    assert re.search(r"\{'loss': \d+\.\d+, 'grad_norm': \d", printed), printed
    assert "'loss': '" not in printed
    assert "Writing model shards" not in printed


def test_a_run_with_a_teacher_cache_says_so(config, tmp_path, caplog):
    cache = tmp_path / "cache"
    assert main(["cache-teacher", "--config", str(config), "--out", str(cache), "--top-k", "8"]) == 0
    with caplog.at_level("INFO", logger="mtakd.distill"):
        assert main(["distill", "--config", str(config), f"teacher.cache={cache}", "training.max_steps=1"]) == 0
    assert f"teacher.cache: the teacher's signals come from {cache} (top-8, bfloat16); the teacher does not run" \
        in caplog.text


def test_without_a_progress_bar_the_log_shows_numbers_too(config, capsys):
    assert main(["distill", "--config", str(config), "training.extra_args={disable_tqdm: true}"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"\{'loss': \d+\.\d+, 'grad_norm': \d", printed), printed
    assert "'loss': '" not in printed
