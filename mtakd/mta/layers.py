"""The layer trajectory (MTA_SPEC §2): which student blocks are aligned to which teacher blocks, at
which granularity. Indices are 1-based block numbers, i.e. ``hidden_states[l]`` of a HF model."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import ConfigError

# `MTAConfig` in annotations is mtakd.config's; not imported, not even for type checking: the
# config validates against this module, which must not depend on it (tests/test_imports.py)


@dataclass(frozen=True)
class KeyLayer:
    student: int
    teacher: int
    granularity: str  # "word" | "phrase"


def phi(l: int, n_student: int, n_teacher: int) -> int:
    """Teacher block of student block l: φ(l) = floor(l · N_T / N_S)."""
    return l * n_teacher // n_student


def _preset(word: list[tuple[int, int]], phrase: list[tuple[int, int]]) -> list[KeyLayer]:
    return [KeyLayer(s, t, "word") for s, t in word] + [KeyLayer(s, t, "phrase") for s, t in phrase]


PRESETS: dict[str, dict] = {
    # the paper's three maps (student ← teacher), MTA_SPEC §2, and its λ_DSA / λ_Hid (§1), which MTAConfig takes
    # from here unless lambda_dsa / lambda_hid are given explicitly
    "gpt2": {"n": (12, 48), "layers": _preset([(6, 24)], [(9, 36), (12, 48)]), "lambda_dsa": 2.0, "lambda_hid": 0.2},
    "qwen1.5": {"n": (24, 24), "layers": _preset([(14, 14)], [(l, l) for l in (16, 18, 20, 22, 24)]),
                "lambda_dsa": 2.0, "lambda_hid": 0.2},
    "opt": {"n": (24, 32), "layers": _preset([(16, 21)], [(18, 24), (20, 26), (22, 29), (24, 32)]),
            "lambda_dsa": 3.0, "lambda_hid": 0.3},
    # our CPU default: SmolLM2-135M (30 blocks) → 10-block student selected from it
    "smollm2-10": {"n": (10, 30), "layers": _preset([(5, 15)], [(7, 21), (10, 30)])},
}


def hidden_widths(model, layers: list[int]) -> list[int]:
    """The width of ``hidden_states[l]`` for each l, as the model returns it (MTA_SPEC §2, §7: W_l is d_S × d_T).

    Read from one no-grad forward pass over two tokens, not from ``config.hidden_size``: the states a model
    returns need not all have that width. OPT with ``word_embed_proj_dim ≠ hidden_size`` (opt-350m: 512 and
    1024) returns ``hidden_states[0..N−1]`` at ``hidden_size`` (the input of block 1, after ``project_in``, and
    the blocks' outputs) but ``hidden_states[N]`` at ``word_embed_proj_dim``: transformers replaces the last entry
    with ``last_hidden_state``, which has gone through the final norm and ``project_out`` (transformers 5.x,
    ``capture_outputs``). Measuring covers any such architecture. The random state is left as it was (dropout)."""
    import torch

    device = model.get_input_embeddings().weight.device
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    accel = [device] if device.type != "cpu" else []
    with torch.no_grad(), torch.random.fork_rng(devices=accel, device_type=device.type if accel else "cuda"):
        states = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True,
                       use_cache=False).hidden_states
    return [states[l].shape[-1] for l in layers]


def resolve_key_layers(cfg: MTAConfig, n_student: int | None, n_teacher: int | None) -> list[KeyLayer]:
    """Resolve the key layers, lowest first. Order of precedence: ``key_layers`` (explicit), ``preset``,
    automatic (``num_key_layers`` strided by ``stride`` from the top; the lowest ``num_word_layers``
    are word-level). Needs the layer counts unless every teacher layer is given."""
    if cfg.key_layers is not None:
        layers = []
        for k in cfg.key_layers:
            t = k.teacher
            if t is None:
                if not (n_student and n_teacher):
                    raise ConfigError("mta.key_layers without `teacher` need both models' layer counts")
                t = phi(k.student, n_student, n_teacher)
            layers.append(KeyLayer(k.student, t, k.granularity))
    elif cfg.preset is not None:
        if cfg.preset not in PRESETS:
            raise ConfigError(f"unknown mta.preset {cfg.preset!r}; allowed: {', '.join(PRESETS)}")
        preset = PRESETS[cfg.preset]
        if n_student and n_teacher and (n_student, n_teacher) != preset["n"]:
            raise ConfigError(
                f"mta.preset {cfg.preset!r} is for a {preset['n'][0]}-layer student and {preset['n'][1]}-layer "
                f"teacher, got {n_student} and {n_teacher}"
            )
        layers = list(preset["layers"])
    else:
        if cfg.num_key_layers == 0:
            return []
        if not (n_student and n_teacher):
            raise ConfigError("automatic key layers need both models' layer counts")
        students = sorted(n_student - i * cfg.stride for i in range(cfg.num_key_layers))
        if students[0] < 1:
            raise ConfigError(
                f"mta: {cfg.num_key_layers} key layers with stride {cfg.stride} do not fit a {n_student}-layer student "
                f"(the lowest would be layer {students[0]}); lower objective.mta.num_key_layers or objective.mta.stride, "
                "or give objective.mta.key_layers (explicit pairs) or objective.mta.preset"
            )
        layers = [
            KeyLayer(s, phi(s, n_student, n_teacher), "word" if i < cfg.num_word_layers else "phrase")
            for i, s in enumerate(students)
        ]
    layers.sort(key=lambda k: k.student)
    for k in layers:
        if (n_student and k.student > n_student) or (n_teacher and k.teacher > n_teacher) or k.teacher < 1:
            raise ConfigError(f"mta key layer {asdict(k)} out of range (student {n_student}, teacher {n_teacher} blocks)")
    if len({k.student for k in layers}) != len(layers):
        raise ConfigError(f"mta key layers repeat a student layer: {[asdict(k) for k in layers]}")
    return layers
