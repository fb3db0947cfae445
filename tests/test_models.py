"""Student selection from the teacher, vocabulary checks, export."""

import copy

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM,
    Qwen2Config, Qwen2ForCausalLM,
)

from mtakd.models import ModelError, block_list, even_layers, save_student, select_student, shared_vocabulary

V = 97
FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                                  num_attention_heads=4, num_key_value_heads=2)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                                  num_attention_heads=4, num_key_value_heads=2)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=6, n_head=4, n_positions=64)),
    "opt": lambda: OPTForCausalLM(OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=6,
                                            num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64)),
}


def test_even_layers_include_first_and_last():
    assert even_layers(30, 10) == [1, 4, 7, 11, 14, 17, 20, 24, 27, 30]
    assert even_layers(4, 2) == [1, 4] and even_layers(5, 5) == [1, 2, 3, 4, 5] and even_layers(7, 1) == [7]
    with pytest.raises(ModelError):
        even_layers(4, 5)


def _hand_built(teacher, layers):
    """The teacher with its block list replaced by (copies of) the chosen blocks."""
    model = copy.deepcopy(teacher)
    name, blocks = block_list(model)
    parent = model.get_submodule(name.rsplit(".", 1)[0])
    setattr(parent, name.rsplit(".", 1)[1], nn.ModuleList(blocks[l - 1] for l in layers))
    model.config.num_hidden_layers = len(layers)
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = [model.config.layer_types[l - 1] for l in layers]
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_selected_student_equals_hand_built_model(family):
    torch.manual_seed(0)
    teacher = FAMILIES[family]().eval()
    layers = [1, 3, 6]
    student = select_student(teacher, layers).eval()
    assert type(student) is type(teacher) and student.config.num_hidden_layers == 3
    ids = torch.randint(0, V, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        got = student(input_ids=ids, attention_mask=mask, use_cache=False).logits
        want = _hand_built(teacher, layers)(input_ids=ids, attention_mask=mask, use_cache=False).logits
        full = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, full)  # the comparison can fail: dropping blocks changes the output
    # the copy is deep: training the student does not touch the teacher
    next(student.parameters()).data.add_(1.0)
    assert not torch.equal(next(student.parameters()), next(teacher.parameters()))


def test_select_student_rejects_bad_layers():
    with pytest.raises(ModelError, match="out of range"):
        select_student(FAMILIES["llama"](), [0, 7])


def test_vocab_mismatch_is_refused(tiny_tokenizer):
    """Another token-to-id map is refused; other numbers of output rows are not (tests/test_padded_vocab.py)."""
    from tests.conftest import build_tokenizer

    other = build_tokenizer(vocab_size=350)
    a, b = FAMILIES["llama"](), FAMILIES["llama"]()
    with pytest.raises(ModelError, match="share a tokenizer"):
        shared_vocabulary(tiny_tokenizer, other, a, b)
    small = LlamaForCausalLM(LlamaConfig(vocab_size=V - 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    assert shared_vocabulary(tiny_tokenizer, tiny_tokenizer, a, small) == min(V - 1, len(tiny_tokenizer))
    # a cached teacher (no model): the tokenizers alone decide
    with pytest.raises(ModelError, match="token-to-id maps differ"):
        shared_vocabulary(tiny_tokenizer, other, None, b)


def test_save_student_leaves_out_extra_modules_and_reloads(tmp_path, tiny_tokenizer):
    model = FAMILIES["llama"]()
    model.add_module("mta_projectors", nn.ModuleList([nn.Linear(32, 32, bias=False)]))
    out = save_student(model, tiny_tokenizer, tmp_path / "s", extra_modules=("mta_projectors",))
    assert hasattr(model, "mta_projectors")  # restored on the live model
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert not hasattr(reloaded, "mta_projectors")
    ids = torch.randint(0, V, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model.eval()(ids).logits)
