"""The layer trajectory (MTA_SPEC §2): which student blocks are aligned to which teacher blocks, at
which granularity. Indices are 1-based block numbers, i.e. ``hidden_states[l]`` of a HF model."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import ConfigError, MTAConfig


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
    # the paper's three maps (student ← teacher), MTA_SPEC §2
    "gpt2": {"n": (12, 48), "layers": _preset([(6, 24)], [(9, 36), (12, 48)])},
    "qwen1.5": {"n": (24, 24), "layers": _preset([(14, 14)], [(l, l) for l in (16, 18, 20, 22, 24)])},
    "opt": {"n": (24, 32), "layers": _preset([(16, 21)], [(18, 24), (20, 26), (22, 29), (24, 32)])},
    # our CPU default: SmolLM2-135M (30 blocks) → 10-block student selected from it
    "smollm2-10": {"n": (10, 30), "layers": _preset([(5, 15)], [(7, 21), (10, 30)])},
}


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
                f"mta: {cfg.num_key_layers} key layers with stride {cfg.stride} do not fit a {n_student}-layer student"
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
