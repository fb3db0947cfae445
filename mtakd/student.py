"""Students built from the teacher: block selection (depth) and Minitron-style width pruning, together.

``student.from_teacher`` keeps ``num_layers`` / ``layers`` of the teacher's blocks (evenly spaced, or ranked
by how much each block changes its input) and optionally prunes the width: ``hidden_size``,
``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads`` (Muralidharan et al. 2024, "Compact
Language Models via Pruning and Knowledge Distillation"; Sreenivas et al. 2024). Heads, MLP neurons and hidden
channels are ranked by their activations on calibration data (``importance: activation``) or by weight norms
(``magnitude``) and the least important are removed from every weight that reads or writes them. The result
is the teacher's own Hugging Face class with a config stating the new sizes (``AutoModelForCausalLM`` reloads
it without custom code); the kept hidden channels are recorded on its config (``mtakd_hidden_channels``) so
that the MTA projectors can start from the channel-selection map (MTA_SPEC §7, ``projector_init: selection``).

The `mtakd student` command is :mod:`mtakd.student_cli`'s. See docs/students.md.
"""

from __future__ import annotations

import copy
import logging
import re
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, FromTeacher, RunConfig
from .models import (  # noqa: F401  (hidden_channels, selection_matrix: re-exported)
    HIDDEN_CHANNELS, ModelError, block_list, even_layers, hidden_channels, plain_copy, select_student,
    selection_matrix,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ architectures
@dataclass(frozen=True)
class Arch:
    """Where the prunable units of one model family live.

    ``rules`` map a state-dict key (regex on its end) to the kind of index each tensor dim carries: ``hidden``
    (residual channels), ``q`` (query-head rows, head-major), ``kv`` (key/value-head rows), ``qkv`` (GPT-2's
    fused q|k|v), ``mlp`` (MLP neurons), ``embed`` (the embedding width: hidden unless OPT projects it).
    Tensors are as stored: ``nn.Linear`` is [out, in], GPT-2's ``Conv1D`` is [in, out].
    """

    rules: tuple[tuple[str, dict[int, str]], ...]
    head_input: str  # block submodule whose input is the per-head attention output (o_proj)
    neuron_input: str  # block submodule whose input is the MLP intermediate activation (down_proj)
    norms: tuple[str, ...]  # block submodules whose outputs are the normalised hidden states
    sizes: dict[str, str]  # width target -> config field
    grouped: bool  # separate num_key_value_heads (GQA); else multi-head attention with heads·head_dim = hidden


_LLAMA = Arch(
    rules=(
        (r"embed_tokens\.weight", {1: "hidden"}),
        (r"lm_head\.weight", {1: "hidden"}),
        (r"\w*norm\.weight", {0: "hidden"}),  # input_layernorm, post_attention_layernorm, model.norm
        (r"self_attn\.q_proj\.weight", {0: "q", 1: "hidden"}),
        (r"self_attn\.q_proj\.bias", {0: "q"}),
        (r"self_attn\.[kv]_proj\.weight", {0: "kv", 1: "hidden"}),
        (r"self_attn\.[kv]_proj\.bias", {0: "kv"}),
        (r"self_attn\.o_proj\.weight", {0: "hidden", 1: "q"}),
        (r"self_attn\.o_proj\.bias", {0: "hidden"}),
        (r"mlp\.(gate|up)_proj\.weight", {0: "mlp", 1: "hidden"}),
        (r"mlp\.(gate|up)_proj\.bias", {0: "mlp"}),
        (r"mlp\.down_proj\.weight", {0: "hidden", 1: "mlp"}),
        (r"mlp\.down_proj\.bias", {0: "hidden"}),
    ),
    head_input="self_attn.o_proj", neuron_input="mlp.down_proj", norms=("input_layernorm", "post_attention_layernorm"),
    sizes={"hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
           "num_attention_heads": "num_attention_heads", "num_key_value_heads": "num_key_value_heads"},
    grouped=True,
)
_GPT2 = Arch(
    rules=(
        (r"wte\.weight", {1: "hidden"}),
        (r"wpe\.weight", {1: "hidden"}),
        (r"lm_head\.weight", {1: "hidden"}),
        (r"ln_(1|2|f)\.(weight|bias)", {0: "hidden"}),
        (r"attn\.c_attn\.weight", {0: "hidden", 1: "qkv"}),
        (r"attn\.c_attn\.bias", {0: "qkv"}),
        (r"attn\.c_proj\.weight", {0: "q", 1: "hidden"}),
        (r"attn\.c_proj\.bias", {0: "hidden"}),
        (r"mlp\.c_fc\.weight", {0: "hidden", 1: "mlp"}),
        (r"mlp\.c_fc\.bias", {0: "mlp"}),
        (r"mlp\.c_proj\.weight", {0: "mlp", 1: "hidden"}),
        (r"mlp\.c_proj\.bias", {0: "hidden"}),
    ),
    head_input="attn.c_proj", neuron_input="mlp.c_proj", norms=("ln_1", "ln_2"),
    sizes={"hidden_size": "n_embd", "intermediate_size": "n_inner", "num_attention_heads": "n_head"},
    grouped=False,
)
_OPT = Arch(
    rules=(
        (r"embed_tokens\.weight", {1: "embed"}),
        (r"lm_head\.weight", {1: "embed"}),
        (r"embed_positions\.weight", {1: "hidden"}),
        (r"project_in\.weight", {0: "hidden"}),  # word_embed_proj_dim != hidden_size (OPT-350m)
        (r"project_out\.weight", {1: "hidden"}),
        (r"\w*layer_norm\.(weight|bias)", {0: "hidden"}),  # self_attn_layer_norm, final_layer_norm
        (r"self_attn\.[qkv]_proj\.weight", {0: "q", 1: "hidden"}),
        (r"self_attn\.[qkv]_proj\.bias", {0: "q"}),
        (r"self_attn\.out_proj\.weight", {0: "hidden", 1: "q"}),
        (r"self_attn\.out_proj\.bias", {0: "hidden"}),
        (r"fc1\.weight", {0: "mlp", 1: "hidden"}),
        (r"fc1\.bias", {0: "mlp"}),
        (r"fc2\.weight", {0: "hidden", 1: "mlp"}),
        (r"fc2\.bias", {0: "hidden"}),
    ),
    head_input="self_attn.out_proj", neuron_input="fc2", norms=("self_attn_layer_norm", "final_layer_norm"),
    sizes={"hidden_size": "hidden_size", "intermediate_size": "ffn_dim", "num_attention_heads": "num_attention_heads"},
    grouped=False,
)
ARCHS = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "gpt2": _GPT2, "opt": _OPT}


def arch_of(model) -> Arch:
    """The pruning description of ``model``'s family (a model or its config); an unsupported one stops with
    what is supported."""
    kind = getattr(model, "config", model).model_type
    if kind not in ARCHS:
        raise ModelError(
            f"student.from_teacher: width pruning (hidden_size, intermediate_size, num_attention_heads, "
            f"num_key_value_heads) supports model types {', '.join(sorted(ARCHS))}; the teacher is {kind!r} "
            f"({type(model).__name__}). Select blocks only (num_layers / layers), which works for any decoder")
    return ARCHS[kind]


@dataclass(frozen=True)
class Geometry:
    """A model's prunable sizes, read through its config."""

    hidden: int
    mlp: int
    heads: int
    kv: int
    head_dim: int

    @classmethod
    def of(cls, config) -> "Geometry":
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if config.model_type == "gpt2":
            mlp = config.n_inner or 4 * config.hidden_size
        elif config.model_type == "opt":
            mlp = config.ffn_dim
        else:
            mlp = config.intermediate_size
        return cls(config.hidden_size, mlp, heads, kv, head_dim)


def target_geometry(teacher, ft: FromTeacher) -> Geometry:
    """The student's sizes from the width targets (missing ones keep the teacher's), checked against the teacher
    (a model or only its config: no weights needed) and against the rules of the model's own config class.

    ``num_key_value_heads`` removes whole kv groups with their query heads, so without ``num_attention_heads``
    the group size is kept; ``num_attention_heads`` alone keeps every kv group (or as many as there are heads).
    In GPT-2 and OPT the attention width equals ``hidden_size``: one of the two sets the other. When only
    ``hidden_size`` is given and the config class refuses the teacher's head count for it (Llama: hidden_size
    must be a multiple of num_attention_heads), the heads are chosen (see :func:`_heads_for_hidden`) and logged."""
    config = getattr(teacher, "config", teacher)
    t = Geometry.of(config)
    arch = arch_of(config)
    key = "student.from_teacher"
    for name, size in ft.width_targets().items():
        have = {"hidden_size": t.hidden, "intermediate_size": t.mlp, "num_attention_heads": t.heads,
                "num_key_value_heads": t.kv}[name]
        if size > have:
            raise ConfigError(f"{key}.{name}: {size} is larger than the teacher's {have}; pruning only removes units")
    hidden, heads, kv = ft.hidden_size, ft.num_attention_heads, ft.num_key_value_heads
    if not arch.grouped:
        kind = config.model_type
        if kv is not None:
            raise ConfigError(f"{key}.num_key_value_heads: {kv}, but {kind} has multi-head attention (one kv head per "
                              "query head); give num_attention_heads")
        if heads is None and hidden is not None:
            if hidden % t.head_dim:
                raise ConfigError(f"{key}.hidden_size: {hidden} must be a multiple of the head_dim {t.head_dim}: in "
                                  f"{kind} the attention width (heads × head_dim) equals hidden_size")
            heads = hidden // t.head_dim
        elif heads is not None and hidden is None:
            hidden = heads * t.head_dim
        elif heads is not None and heads * t.head_dim != hidden:
            raise ConfigError(f"{key}.num_attention_heads: {heads} heads × head_dim {t.head_dim} must equal "
                              f"hidden_size {hidden} in {kind} (its attention width is hidden_size)")
        heads = heads or t.heads
        kv = heads
    else:
        if kv is None:
            kv = t.kv if heads is None else min(t.kv, heads)
        if heads is None:
            heads = kv * (t.heads // t.kv)
        if heads % kv:
            raise ConfigError(f"{key}.num_attention_heads: {heads} is not a multiple of num_key_value_heads {kv} "
                              "(query heads come in equal groups per kv head)")
        if heads // kv > t.heads // t.kv:
            raise ConfigError(f"{key}.num_attention_heads: {heads} over {kv} kv heads is {heads // kv} query heads "
                              f"per group, more than the teacher's {t.heads // t.kv} (heads are removed within "
                              "groups, never added)")
    geo = Geometry(hidden or t.hidden, ft.intermediate_size or t.mlp, heads, kv, t.head_dim)
    # the class's own rules (a teacher config that fails them itself, e.g. an old checkpoint's, is not held to them)
    problem = _config_problem(config, arch, geo) if _config_problem(config, arch, t) is None else None
    if problem and arch.grouped and hidden is not None and ft.num_attention_heads is None:
        geo = _heads_for_hidden(config, arch, geo, t, ft, problem)
    elif problem:
        raise ConfigError(f"{key}: {type(config).__name__} refuses the student's sizes ({_sizes(geo)}): {problem}; "
                          f"change the width targets of {key}")
    return geo


def _sizes(g: Geometry) -> str:
    return (f"hidden_size {g.hidden}, intermediate_size {g.mlp}, num_attention_heads {g.heads}, "
            f"num_key_value_heads {g.kv}")


def resized_config(config, arch: Arch, g: Geometry, projected: bool | None = None):
    """A copy of ``config`` stating the sizes of ``g`` (``head_dim`` written explicitly for grouped attention;
    OPT's ``word_embed_proj_dim`` follows the hidden size unless the embeddings are projected)."""
    cfg = copy.deepcopy(config)
    sizes = {"hidden_size": g.hidden, "intermediate_size": g.mlp, "num_attention_heads": g.heads,
             "num_key_value_heads": g.kv}
    for name, fld in arch.sizes.items():
        setattr(cfg, fld, sizes[name])
    if arch.grouped:
        cfg.head_dim = g.head_dim
    if projected is None:
        projected = getattr(config, "word_embed_proj_dim", None) not in (None, config.hidden_size)
    if cfg.model_type == "opt" and not projected:
        cfg.word_embed_proj_dim = g.hidden
    return cfg


def _config_problem(config, arch: Arch, g: Geometry) -> str | None:
    """Why the model's config class refuses a config of these sizes (its own validation), or None."""
    cfg = resized_config(config, arch, g)
    try:
        check = getattr(cfg, "validate", None)
        check() if callable(check) else type(cfg)(**cfg.to_dict())
    except Exception as e:  # noqa: BLE001 - transformers raises ValueError or huggingface_hub's validation error
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        return re.sub(r"^\w*Error: ", "", lines[-1] if lines else type(e).__name__).rstrip(".")
    return None


_told: set[str] = set()


def _heads_for_hidden(config, arch: Arch, geo: Geometry, t: Geometry, ft: FromTeacher, problem: str) -> Geometry:
    """Only ``hidden_size`` given and the config class refuses the teacher's head count for it: keep head_dim and
    hidden_size = heads × head_dim (the teacher's own ratio), the kv heads given or as many as the groups allow;
    said once in the log. If hidden_size is no multiple of head_dim or that head count fits no kv grouping, stop
    and ask for num_attention_heads, naming head counts that would fit."""
    key = "student.from_teacher"
    group = t.heads // t.kv
    kv_options = [ft.num_key_value_heads] if ft.num_key_value_heads else range(t.kv, 0, -1)
    fits = []
    for h in range(t.heads, 0, -1):
        kv = next((k for k in kv_options if h % k == 0 and h // k <= group), None)
        if kv is not None and _config_problem(config, arch, Geometry(geo.hidden, geo.mlp, h, kv, t.head_dim)) is None:
            fits.append(Geometry(geo.hidden, geo.mlp, h, kv, t.head_dim))
    chosen = next((g for g in fits if g.heads * t.head_dim == geo.hidden), None)
    if chosen is None:
        some = ", ".join(str(g.heads) for g in fits[:4])
        ratio = (f"{geo.hidden // t.head_dim} heads of head_dim {t.head_dim} fit no grouping of the kv heads "
                 f"({t.kv} kv heads, at most {group} query heads each)" if geo.hidden % t.head_dim == 0 else
                 f"{geo.hidden} is no multiple of head_dim {t.head_dim}, so no head count keeps hidden_size = "
                 "heads × head_dim")
        raise ConfigError(
            f"{key}.hidden_size: {geo.hidden} with the teacher's {t.heads} attention heads: {problem}, and {ratio}; "
            f"give {key}.num_attention_heads (and num_key_value_heads)"
            + (f": {type(config).__name__} takes e.g. {some} heads" if some else ""))
    note = (f"{key}.hidden_size: {geo.hidden}: {type(config).__name__} refuses the teacher's {t.heads} attention "
            f"heads ({problem}); the student keeps {chosen.heads} query heads over {chosen.kv} kv heads "
            f"(head_dim {chosen.head_dim}); set {key}.num_attention_heads / num_key_value_heads to choose")
    if note not in _told:
        _told.add(note)
        log.warning(note)
    return chosen


# ------------------------------------------------------------------------------------ pruning
@dataclass
class Selection:
    """What a pruned student keeps, in the numbering of the model being pruned (ascending indices).

    ``heads[l]`` are query heads of layer l, grouped by kv head (``kv[l]``), ``mlp[l]`` MLP neurons,
    ``hidden`` residual channels; None keeps everything of that kind."""

    hidden: torch.Tensor | None = None
    heads: list[torch.Tensor] | None = None
    kv: list[torch.Tensor] | None = None
    mlp: list[torch.Tensor] | None = None


def _rows(units: torch.Tensor, size: int) -> torch.Tensor:
    """Row indices of whole units (heads) of ``size`` rows each."""
    return (units[:, None] * size + torch.arange(size)).flatten()


def prune_width(model: nn.Module, sel: Selection) -> nn.Module:
    """A model of ``model``'s class keeping only the selected heads, kv groups, neurons and hidden channels.

    Every weight that reads or writes a removed unit loses that row/column (embeddings, every norm, q/k/v/o,
    the MLP, the LM head, tied or not); the config states the new sizes (``head_dim`` written explicitly)."""
    arch = arch_of(model)
    g = Geometry.of(model.config)
    prefix, blocks = block_list(model)
    n = len(blocks)
    full = lambda k: torch.arange(k)  # noqa: E731
    hidden = sel.hidden if sel.hidden is not None else full(g.hidden)
    heads = sel.heads or [full(g.heads)] * n
    kv = sel.kv or ([full(g.kv)] * n if arch.grouped else heads)
    mlp = sel.mlp or [full(g.mlp)] * n
    projected = getattr(model.config, "word_embed_proj_dim", g.hidden) != g.hidden  # OPT-350m's project_in/out
    rules = [(re.compile(rf"(^|\.){pattern}$"), dims) for pattern, dims in arch.rules]
    layer_re = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    state = {}
    for key, value in model.state_dict().items():
        m = layer_re.match(key)
        index = {"hidden": hidden, "embed": None if projected else hidden}
        if m:
            l = int(m.group(1))
            q = _rows(heads[l], g.head_dim)
            index.update(q=q, kv=_rows(kv[l], g.head_dim), mlp=mlp[l],
                          qkv=torch.cat([q, q + g.heads * g.head_dim, q + 2 * g.heads * g.head_dim]))
        for pattern, dims in rules:
            if pattern.search(key):
                for dim, kind in dims.items():
                    if index.get(kind) is not None:
                        value = value.index_select(dim, index[kind].to(value.device))
                break
        state[key] = value
    if any(len(x) != len(y) for per in (heads, kv, mlp) for x, y in zip(per, per[1:])):
        raise ModelError("prune_width: every layer must keep the same number of heads, kv heads and neurons")
    cfg = resized_config(model.config, arch, Geometry(len(hidden), len(mlp[0]), len(heads[0]), len(kv[0]), g.head_dim),
                         projected)
    if projected and len(hidden) == model.config.word_embed_proj_dim:
        state = _fold_projections(state)  # HF builds no project_in/out at equal widths
        cfg.tie_word_embeddings = False
    student = plain_copy(model, cfg).train(model.training)
    student.load_state_dict(state, strict=True)
    for attr in ("mtakd_selected_layers", HIDDEN_CHANNELS):
        if hasattr(model.config, attr):
            setattr(student.config, attr, getattr(model.config, attr))
    return student


def _fold_projections(state: dict) -> dict:
    """OPT pruned to ``hidden_size = word_embed_proj_dim`` (e.g. OPT-350m to 512): transformers builds no
    ``project_in`` / ``project_out`` at equal widths, so they are folded into the word embeddings and the LM head,
    exactly up to rounding: ``embed_tokens ← E·P_inᵀ``, ``lm_head ← W·P_out`` ([V, p]·[p, h]). The two are no
    longer the same matrix, so the student's head is untied."""
    key = lambda end: next(k for k in state if k == end or k.endswith("." + end))  # noqa: E731
    p_in, p_out = state.pop(key("project_in.weight")), state.pop(key("project_out.weight"))
    emb, head = key("embed_tokens.weight"), key("lm_head.weight")
    state[emb] = (state[emb].float() @ p_in.float().T).to(state[emb].dtype)
    state[head] = (state[head].float() @ p_out.float()).to(state[head].dtype)
    return state


# --------------------------------------------------------------------------------- importance
@dataclass
class Importance:
    """Scores per teacher layer: ``heads`` [L, H], ``mlp`` [L, F], ``hidden`` [d], ``blocks`` [L]; ``groups``
    [L, KV] scores the kv groups (None: the sum of their query heads' scores)."""

    heads: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    mlp: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    blocks: torch.Tensor | None = None
    samples: int = 0
    seconds: float = 0.0


def magnitude_importance(model: nn.Module) -> Importance:
    """Weight-norm scores (no data): the L2 norm of every weight that reads or writes a unit (a query head also
    counts its kv head's weights; a channel the embeddings, norms and every projection it enters or leaves)."""
    arch = arch_of(model)
    g = Geometry.of(model.config)
    prefix, blocks = block_list(model)
    n = len(blocks)
    sq = {"hidden": torch.zeros(g.hidden), "q": torch.zeros(n, g.heads * g.head_dim),
          "kv": torch.zeros(n, g.kv * g.head_dim), "mlp": torch.zeros(n, g.mlp)}
    rules = [(re.compile(rf"(^|\.){pattern}$"), dims) for pattern, dims in arch.rules]
    layer_re = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    projected = getattr(model.config, "word_embed_proj_dim", g.hidden) != g.hidden
    for key, value in model.state_dict().items():
        m = layer_re.match(key)
        for pattern, dims in rules:
            if not pattern.search(key):
                continue
            w = value.detach().float().cpu() ** 2
            for dim, kind in dims.items():
                kind = "hidden" if kind == "embed" and not projected else kind
                if kind not in sq and kind != "qkv":
                    continue
                per = w.sum(dim=[d for d in range(w.dim()) if d != dim]) if w.dim() > 1 else w
                if kind == "hidden":
                    sq["hidden"] += per
                elif kind == "qkv":
                    sq["q"][int(m.group(1))] += per.view(3, -1).sum(0)
                else:
                    sq[kind][int(m.group(1))] += per
            break
    heads = sq["q"].view(n, g.heads, g.head_dim).sum(-1)
    if arch.grouped:
        heads = heads + sq["kv"].view(n, g.kv, g.head_dim).sum(-1).repeat_interleave(g.heads // g.kv, dim=1)
    return Importance(heads=heads.sqrt(), mlp=sq["mlp"].sqrt(), hidden=sq["hidden"].sqrt())


def activation_importance(model: nn.Module, batches, *, heads=True, mlp=True, hidden=True, blocks=False,
                          progress: bool = True, aggregation: str = "mtakd") -> Importance:
    """Minitron's activation scores on calibration batches (one forward of the base model per batch, no LM head).

    ``aggregation: mtakd``: per head, the L2 norm of its attention output (the input of o_proj) per token; per
    MLP neuron, |activation| entering down_proj; per hidden channel, |normalised hidden state| averaged over
    every block's norms. Each is averaged over the sequence (padding masked), then the L2 norm over the samples
    is taken; a kv group scores the sum of its query heads.

    ``aggregation: modelopt`` (NVIDIA ModelOpt's Minitron hooks): per channel of the o_proj input, the sequence
    mean of |x|, then L2 over the samples, then per head the L2 norm over its head_dim channels (a kv group: the
    L2 norm over its heads' channels); MLP neurons as mtakd; per hidden channel, the sequence mean of |norm
    output|, L2 over the samples for each norm separately, then the sum over the norms.

    ``blocks``: per block, the mean over tokens of 1 − cos(block input, block output) (Men et al. 2024,
    ShortGPT's block influence)."""
    from tqdm.auto import tqdm

    arch = arch_of(model) if (heads or mlp or hidden) else None
    g = Geometry.of(model.config)
    _, layers = block_list(model)
    n = len(layers)
    if aggregation not in ("mtakd", "modelopt"):
        raise ValueError(f"activation_importance: aggregation must be mtakd or modelopt, not {aggregation!r}")
    modelopt = aggregation == "modelopt"
    n_norms = len(arch.norms) if arch else 0
    acc = {"heads": torch.zeros(n, g.heads * g.head_dim if modelopt else g.heads), "mlp": torch.zeros(n, g.mlp),
           "hidden": torch.zeros(n * n_norms if modelopt else 1, g.hidden), "blocks": torch.zeros(n)}
    cur: dict = {}

    def seq_mean(x):  # [B, T, ...] (or [B·T, ...]: OPT flattens inside its MLP) -> [B, ...], mean over real tokens
        if x.shape[:2] != cur["mask"].shape:
            x = x.reshape(*cur["mask"].shape, *x.shape[1:])
        m = cur["mask"].view(*cur["mask"].shape, *([1] * (x.dim() - 2)))
        return (x.float() * m).sum(1) / cur["lengths"].view(-1, *([1] * (x.dim() - 2)))

    hooks = []
    for l, block in enumerate(layers):
        if heads:
            def head_hook(mod, args, l=l):
                x = args[0].float()
                per = x.abs() if modelopt else x.unflatten(-1, (-1, g.head_dim)).norm(dim=-1)  # channels / heads
                acc["heads"][l] += seq_mean(per).pow(2).sum(0).cpu()
            hooks.append(block.get_submodule(arch.head_input).register_forward_pre_hook(head_hook))
        if mlp:
            def mlp_hook(mod, args, l=l):
                acc["mlp"][l] += seq_mean(args[0].abs()).pow(2).sum(0).cpu()
            hooks.append(block.get_submodule(arch.neuron_input).register_forward_pre_hook(mlp_hook))
        if hidden:
            for k, name in enumerate(arch.norms):
                def norm_hook(mod, args, out, i=l * n_norms + k):
                    if modelopt:  # L2 over the samples per norm
                        acc["hidden"][i] += seq_mean(out.abs()).pow(2).sum(0).cpu()
                    else:
                        cur["hidden"] = cur["hidden"] + seq_mean(out.abs())
                hooks.append(block.get_submodule(name).register_forward_hook(norm_hook))
        if blocks:
            def block_hook(mod, args, kwargs, out, l=l):
                x = args[0] if args else kwargs["hidden_states"]
                y = out[0] if isinstance(out, tuple) else out
                acc["blocks"][l] += seq_mean(1 - F.cosine_similarity(x.float(), y.float(), dim=-1)).sum().cpu()
            hooks.append(block.register_forward_hook(block_hook, with_kwargs=True))
    base = model.base_model if model.base_model is not model else model
    start, samples, was_training = time.perf_counter(), 0, model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc="calibration", unit="batch", disable=not progress):
                mask = batch["attention_mask"].to(model.device)
                cur.update(mask=mask.float(), lengths=mask.sum(1).clamp(min=1).float(), hidden=0.0)
                base(input_ids=batch["input_ids"].to(model.device), attention_mask=mask, use_cache=False)
                if hidden and not modelopt:
                    acc["hidden"][0] += (cur["hidden"] / (n * n_norms)).pow(2).sum(0).cpu()
                samples += mask.shape[0]
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    head_scores = groups = None
    if heads:
        head_scores = acc["heads"].sqrt()  # [L, H] (mtakd) or per channel [L, H·head_dim] (modelopt)
        if modelopt:
            channels = head_scores.view(n, g.kv, g.heads // g.kv, g.head_dim)  # query heads grouped by kv head
            head_scores, groups = channels.norm(dim=-1).flatten(1), channels.flatten(2).norm(dim=-1)
    return Importance(heads=head_scores, groups=groups, mlp=acc["mlp"].sqrt() if mlp else None,
                      hidden=acc["hidden"].sqrt().sum(0) if hidden else None,
                      blocks=acc["blocks"] / max(samples, 1) if blocks else None,
                      samples=samples, seconds=time.perf_counter() - start)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` highest-scoring indices, ascending (the kept units keep their order)."""
    return torch.topk(scores, k, sorted=False).indices.sort().values


def select_units(imp: Importance, teacher_geo: Geometry, target: Geometry, layers: list[int]) -> Selection:
    """Which units to keep (GQA-aware, Minitron): the kv groups with the largest summed head scores, then the
    top query heads within each kept group (equal group sizes), the top neurons per layer, the top channels."""
    t = teacher_geo
    sel = Selection()
    if target.hidden < t.hidden:
        sel.hidden = _top(imp.hidden, target.hidden)
    if target.mlp < t.mlp:
        sel.mlp = [_top(imp.mlp[l - 1], target.mlp) for l in layers]
    if target.heads < t.heads or target.kv < t.kv:
        r_t, r_s = t.heads // t.kv, target.heads // target.kv
        sel.heads, sel.kv = [], []
        for l in layers:
            per_group = imp.heads[l - 1].view(t.kv, r_t)  # query heads grouped by the kv head they read
            groups = _top(per_group.sum(-1) if imp.groups is None else imp.groups[l - 1], target.kv)
            within = torch.topk(per_group[groups], r_s, dim=-1).indices.sort(-1).values  # [kv', r']
            sel.kv.append(groups)
            sel.heads.append((groups[:, None] * r_t + within).flatten())
    return sel


# ----------------------------------------------------------------------------------- calibration
def calibration_examples(cfg: RunConfig, tokenizer):
    """(calibration examples, held-out examples): the records of ``calibration.data`` (default ``data.train``)
    in a fixed-seed shuffle, formatted and tokenised as in training (template, system prompt, response labels),
    cut to ``calibration.max_length`` tokens; the first ``held_out`` records are set aside."""
    import random

    from .data import build_examples, load_records

    cal = cfg.student.from_teacher.calibration
    sources = cal.data or cfg.data.train
    records = [r for src in sources for r in load_records(src)]
    random.Random(0).shuffle(records)
    held, rest = records[: cal.held_out], records[cal.held_out: cal.held_out + cal.samples]
    if len(rest) < cal.batch_size:
        raise ConfigError(
            f"student.from_teacher.calibration: {len(records)} records in {sources} leave {len(rest)} for calibration "
            f"after held_out {cal.held_out}, fewer than one batch (batch_size {cal.batch_size})")
    if len(rest) < cal.samples:
        log.warning("calibration: only %d of calibration.samples=%d records available", len(rest), cal.samples)
    data_cfg = cfg.data.model_copy(update={"max_length": cal.max_length,
                                           "max_prompt_length": min(cfg.data.max_prompt_length, cal.max_length - 1)})
    build = lambda recs: build_examples(recs, tokenizer, data_cfg, progress=False) if recs else []  # noqa: E731
    return build(rest), build(held)


def batches(examples, pad_token_id: int, batch_size: int) -> list[dict]:
    """Padded batches of examples of similar length (sorted by length: little padding)."""
    from .data import Collator, length_batches

    collate = Collator(pad_token_id, pad_to_multiple_of=None)
    longest_first = [-len(e.input_ids) for e in examples]  # the order calibration has always used
    return [collate([examples[i] for i in idx]) for idx in length_batches(longest_first, batch_size)]


def build_student(cfg: RunConfig, teacher: nn.Module, tokenizer, *, progress: bool = True,
                  examples=None) -> tuple[nn.Module, dict]:
    """(student, report): the teacher's chosen blocks, pruned to the width targets of ``student.from_teacher``.

    Deterministic for a given config and teacher: ``mtakd student`` and ``mtakd distill`` build the same weights.
    ``examples``: (calibration, held-out) examples, if already built."""
    ft = cfg.student.from_teacher
    n_t = teacher.config.num_hidden_layers
    n_s = ft.num_layers or (len(ft.layers) if ft.layers else n_t)
    if n_s > n_t:
        raise ConfigError(f"student.from_teacher.num_layers: {n_s} is larger than the teacher's {n_t} blocks")
    targets = ft.width_targets()
    t_geo = Geometry.of(teacher.config) if targets else None
    s_geo = target_geometry(teacher, ft) if targets else None
    width = bool(targets) and s_geo != t_geo
    rank_blocks = ft.layer_selection == "importance" and n_s < n_t
    report = {"teacher_layers": n_t, "importance": ft.importance if width else None,
              "layer_selection": ft.layer_selection if ft.num_layers else "layers" if ft.layers else "all",
              "calibration_samples": 0, "calibration_seconds": 0.0}
    imp = Importance()
    if (width and ft.importance == "activation") or rank_blocks:
        calib, _ = examples if examples is not None else calibration_examples(cfg, tokenizer)
        scorer = teacher
        if ft.calibration.dtype != "teacher" and getattr(torch, ft.calibration.dtype) != teacher.dtype:
            scorer = copy.deepcopy(teacher).to(getattr(torch, ft.calibration.dtype))
        imp = activation_importance(scorer, batches(calib, tokenizer.pad_token_id, ft.calibration.batch_size),
                                    heads=width, mlp=width, hidden=width, blocks=rank_blocks, progress=progress,
                                    aggregation=ft.calibration.aggregation)
        report.update(calibration_samples=imp.samples, calibration_seconds=round(imp.seconds, 2),
                      calibration_tokens=sum(len(e.input_ids) for e in calib))
        del scorer
    if width and ft.importance == "magnitude":
        imp = magnitude_importance(teacher)
    if ft.layers:
        layers = list(ft.layers)
    elif rank_blocks:
        layers = [int(i) + 1 for i in _top(imp.blocks, n_s)]
        report["block_importance"] = [round(float(x), 6) for x in imp.blocks]
    else:
        layers = even_layers(n_t, n_s)
    student = select_student(teacher, layers) if layers != list(range(1, n_t + 1)) else plain_copy(teacher)
    student.config.mtakd_selected_layers = layers
    report["layers"] = layers
    if width:
        sel = select_units(imp, t_geo, s_geo, layers)
        student = prune_width(student, sel)
        if sel.hidden is not None:
            setattr(student.config, HIDDEN_CHANNELS, sel.hidden.tolist())
        report["hidden_channels"] = sel.hidden.tolist() if sel.hidden is not None else None
        report["per_layer"] = [
            {"teacher_layer": l,
             "heads": sel.heads[j].tolist() if sel.heads else None,
             "kv_heads": sel.kv[j].tolist() if sel.kv and arch_of(teacher).grouped else None,
             "neurons": sel.mlp[j].tolist() if sel.mlp else None}
            for j, l in enumerate(layers)]
        report["width"] = {"teacher": vars(t_geo), "student": vars(s_geo)}
    dtype = teacher.dtype if cfg.student.dtype == "auto" else getattr(torch, cfg.student.dtype)
    if student.dtype != dtype:  # student.dtype (float32 master weights by default), whatever the teacher's
        student.to(dtype)
    return student, report
