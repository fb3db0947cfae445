"""`mtakd distill` (and `mtakd objectives`): from a config to a saved student — the output directory, training,
export. What a run needs before training (layer map, checks, models, datasets) is :mod:`mtakd.run`'s."""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path

from . import run
from .config import ConfigError, RunConfig, add_config_command, load_config
from .run import RUN_FILE, build_datasets, build_models, check_cheaply, resolve, versions  # noqa: F401

log = logging.getLogger(__name__)

STUDENT_DIR = "student"


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
        changed = [line for k in ("teacher", "student", "data", "objective")
                   for line in _differences(previous.get(k), mine[k], k)]
        if changed:
            raise ConfigError(f"--resume: the config differs from the run in {out} (run → now): " + "; ".join(changed)
                              + " — only `training` may change on resume; start a new run for the rest")
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


def _differences(old, new, key: str) -> list[str]:
    """``key.sub: old → new`` for every value that differs between two config sections."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for k in sorted(set(old) | set(new)) for line in _differences(old.get(k), new.get(k), f"{key}.{k}")]
    return [] if old == new else [f"{key}: {json.dumps(old)} → {json.dumps(new)}"]


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


# --------------------------------------------------------------------------------------- running
def distill(cfg: RunConfig, *, resume: str | bool | None = None, overwrite: bool = False) -> Path:
    """Train a student as configured; returns the directory of the saved student."""
    from transformers import set_seed

    from .mta import PROJECTORS, MTALoss, resolve_key_layers
    from .objectives import build_objective
    from .plots import write_loss_plot
    from .trainer import DistillTrainer

    from accelerate import PartialState

    run._cpu_processes()
    if cfg.teacher.device_map is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not cfg.teacher.cache:
        raise ConfigError("teacher.device_map spreads the teacher over the devices of one process; with several "
                          "processes each would place a whole teacher over the same GPUs. Run one process, or shard "
                          "the teacher with DeepSpeed ZeRO-3 (configs/accelerate/deepspeed_zero3.yaml), or train from "
                          "a teacher cache (docs/scaling.md, \"Large teachers\")")
    state = PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"))
    out, checkpoint = _check_output_dir(cfg, resume, overwrite)  # every process, before anything is built
    check_cheaply(cfg)  # data files, layer map, width targets: before any weights are loaded
    state.wait_for_everyone()  # ... and before the main process may replace the directory
    set_seed(cfg.training.seed)
    objective = build_objective(cfg.objective)
    if cfg.teacher.cache and cfg.objective.cross_tokenizer:
        raise ConfigError("teacher.cache holds the teacher's signals at the student's token positions, so it cannot "
                          "serve objective.cross_tokenizer: true; remove teacher.cache")
    cache = _open_teacher_cache(cfg, objective) if cfg.teacher.cache else None
    # with a cache, the teacher runs only on sequences made during training ("partial" bases, e.g. DistiLLM's SGO)
    online = cache is None or objective.teacher_cache_use() == "partial"
    teacher, student, tok = build_models(cfg, load_teacher=online)
    n_teacher = teacher.config.num_hidden_layers if teacher is not None else cache.num_teacher_layers
    mta = keys = None
    if cfg.objective.mta_enabled:
        keys = resolve_key_layers(cfg.objective.mta, student.config.num_hidden_layers, n_teacher)
        if keys:
            mta = MTALoss(cfg.objective.mta, keys)
    if cache is not None:  # stops with every difference between the cache and this run
        cache.check(cfg, tok, keys or [], teacher=teacher,
                    vocab_rows=student.get_output_embeddings().weight.shape[0])
        log.info("teacher.cache: the teacher's signals come from %s (%s, %s)%s", cache.dir,
                 f"top-{cache.top_k}" if cache.top_k else "full distributions", cache.manifest.get("dtype"),
                 "; the teacher runs only on the sequences the objective generates" if online
                 else "; the teacher does not run")
    teacher_config = teacher.config if teacher is not None else _teacher_config(cfg, n_teacher)
    if mta is not None and cfg.objective.mta.lambda_hid > 0:  # only L_Hid uses (and trains) the projectors
        # widths of the states the models return (OPT's project_out narrows the top one), identity init
        # only for a student built from the teacher, here or earlier by `mtakd student` (projector_init: auto)
        widths = cache.widths([k.teacher for k in keys]) if teacher is None else None
        built = cfg.student.from_teacher is not None or hasattr(student.config, "mtakd_selected_layers")
        student.add_module(PROJECTORS, mta.projectors_for(
            student, teacher, teacher_widths=widths, from_teacher=built,
            teacher_config=teacher_config))
    if not online:
        teacher = None  # loaded only to build the student from it: every teacher signal comes from the cache
    if not cfg.objective.cross_tokenizer:  # the KD terms compare the tokenizer's ids, not padded rows
        from .models import vocabulary_ids

        objective.set_vocabulary(vocabulary_ids(tok))
    objective.setup(cfg, tok, student, teacher)
    t_tok = None
    if cfg.objective.cross_tokenizer:  # both tokenisations of each text (docs/method.md, "Different tokenizers")
        from .data import CrossCollator
        from .models import load_tokenizer

        t_tok = load_tokenizer(cfg.teacher)
    train, val, stats = build_datasets(cfg, tok, objective=objective, teacher_tokenizer=t_tok)
    collator = objective.collator(tok.pad_token_id)
    if t_tok is not None:
        t_pad = t_tok.pad_token_id if t_tok.pad_token_id is not None else (t_tok.eos_token_id or 0)
        collator = CrossCollator(tok.pad_token_id, t_pad)
    if cache is not None:
        from .teacher_cache import IndexedCollator, IndexedDataset

        cache.check_examples("train", train)
        cache.check_examples("validation", val)
        train = IndexedDataset(train, "train")
        val = IndexedDataset(val, "validation") if val is not None else None
        collator = IndexedCollator(collator)
    run_info = {**cfg.model_dump(mode="json"), "resolved": resolve(cfg, teacher_config), "versions": versions(),
                "data_stats": vars(stats)}
    if cache is not None:
        run_info["teacher_cache"] = {k: cache.manifest.get(k) for k in ("top_k", "dtype", "teacher", "layers")}
    if state.is_main_process:  # models and data are usable: only now replace an old run (--overwrite)
        _prepare_output_dir(cfg, resume, overwrite)
        (out / RUN_FILE).write_text(json.dumps(run_info, indent=2))
    state.wait_for_everyone()
    if not (objective.needs_teacher or mta):
        teacher = None  # e.g. SFT: free the memory
    # DDP: the projectors are used in compute_loss, outside the student's forward, which DDP's unused-parameter
    # search would mark ready twice; every trainable parameter is used in every step, so the search is off
    ddp = {} if "ddp_find_unused_parameters" in cfg.training.extra_args else {"ddp_find_unused_parameters": False}
    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    if cfg.training.fp16 and (on_cpu or cfg.training.extra_args.get("use_cpu") or not run._has_accelerator()):
        raise ConfigError("training.fp16 needs a GPU: on the CPU accelerate turns fp16 mixed precision off (no autocast, "
                          "no gradient scaler) and the run would silently train in float32; use training.bf16, which "
                          "is CPU autocast to bfloat16 (docs/scaling.md, \"bf16\")")
    # (set by _cpu_processes on a machine without GPUs, or by `accelerate launch --cpu`); bf16 without a GPU:
    # TrainingArguments refuses it unless told to run on the CPU, where it is CPU autocast (docs/scaling.md)
    if (on_cpu or (cfg.training.bf16 and not run._has_accelerator())) and "use_cpu" not in cfg.training.extra_args:
        ddp["use_cpu"] = True
    args = cfg.training.to_training_arguments(
        has_eval=val is not None, **ddp,
        **({"activation_checkpointing": True} if cfg.student.gradient_checkpointing else {}),
    )
    trainer = DistillTrainer(
        model=student, args=args, train_dataset=train, eval_dataset=val,
        data_collator=collator, processing_class=tok, teacher=teacher, objective=objective,
        mta=mta, projector_lr=cfg.objective.mta.projector_lr if mta else 0.0,
        on_nonfinite=cfg.training.on_nonfinite, teacher_cache=cache,
    )
    resumed = _resume_state(checkpoint, trainer, cfg.training)
    if resumed is not None and resumed.global_step >= resumed.max_steps:
        # the Trainer would run one more step past max_steps (transformers 5.23): export the checkpoint as it is
        log.info("%s already holds the last step: exporting it without training", checkpoint)
        trainer._load_from_checkpoint(checkpoint)
        trainer.state = resumed
    else:
        trainer.train(resume_from_checkpoint=checkpoint)
    final = _export_student(trainer, tok, out, with_projectors=hasattr(student, PROJECTORS))
    if trainer.accelerator.is_main_process:
        (final / RUN_FILE).write_text(json.dumps(run_info, indent=2))
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
        lambdas = {"lambda_dsa": cfg.objective.mta.lambda_dsa, "lambda_hid": cfg.objective.mta.lambda_hid} if mta else {}
        plot = write_loss_plot(trainer.state.log_history, out, lambdas)  # warns instead of failing the run
        log.info("student saved to %s%s", final, f"; loss curves in {plot}" if plot else "")
    trainer.accelerator.wait_for_everyone()
    return final


def _open_teacher_cache(cfg: RunConfig, objective):
    """The run's :class:`~mtakd.teacher_cache.TeacherCache`; a base that cannot train from it stops here."""
    from .teacher_cache import TeacherCache

    if objective.teacher_cache_use() == "none":
        raise ConfigError(f"teacher.cache: base objective {cfg.objective.base!r} cannot be trained from a teacher cache "
                          f"({objective.teacher_cache_reason()}); remove teacher.cache (docs/objectives.md)")
    return TeacherCache(cfg.teacher.cache)


def _teacher_config(cfg: RunConfig, n_teacher: int):
    """The teacher's model config without its weights (for ``resolve``), or its layer count from the cache."""
    import types

    from .models import load_config as load_model_config

    return load_model_config(cfg.teacher) or types.SimpleNamespace(num_hidden_layers=n_teacher)


# schedules whose learning rate at a step depends on the total number of steps
_LENGTH_DEPENDENT = ("linear", "cosine", "cosine_with_restarts", "polynomial")


def _resume_state(checkpoint, trainer, training):
    """The checkpoint's TrainerState with ``max_steps`` set to this run's total (which may extend the run: the
    Trainer then trains the remaining steps), after logging where the run resumes. None without a checkpoint."""
    if not checkpoint:
        return None
    from transformers.trainer_callback import TrainerState

    state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    total = trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]
    log.info("resuming from %s (step %d of %d)", checkpoint, state.global_step, total)
    length_dependent = training.lr_scheduler_type in _LENGTH_DEPENDENT or 0 < training.warmup_steps < 1
    if total != state.max_steps and state.global_step < total and length_dependent:
        log.warning("the run now has %d steps (was %d): the %s learning-rate schedule is rebuilt for the new length, "
                    "so the learning rate from step %d on differs from both runs' original schedule "
                    "(see docs/scaling.md)", total, state.max_steps, training.lr_scheduler_type, state.global_step + 1)
    state.max_steps = total
    return state


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
    if args.resume is not None and "=" in args.resume:  # `--resume key=value`: an override, not a checkpoint
        args.overrides, args.resume = [*args.overrides, args.resume], "latest"
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(json.dumps({**cfg.model_dump(mode="json"), "resolved": check_cheaply(cfg, dry_run=True)}, indent=2))
        return 0
    distill(cfg, resume=args.resume, overwrite=args.overwrite)  # logs "student saved to ..." (once)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # A rank of a finished multi-process run could still abort in the interpreter's teardown ("terminate
        # called without an active exception": a native thread destroyed unjoined), even after leaving the
        # process group. Everything is written by now: leave the group, flush, and exit without that teardown.
        dist.destroy_process_group()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def first_sentence(doc: str) -> str:
    """The first sentence of a docstring, on one line: its first paragraph up to the first full stop outside
    brackets that is followed by a capital (so "et al. 2015" does not end it); a paragraph ending with ":"
    takes the display (e.g. a formula) that follows it."""
    paras = [p for p in re.split(r"\n\s*\n", inspect.cleandoc(doc or "")) if p.strip()] or [""]
    text = " ".join(paras[0].split())
    if text.endswith(":") and len(paras) > 1:  # one display line after another, separated by ";"
        text += " " + "; ".join(" ".join(line.split()) for line in paras[1].splitlines() if line.strip())
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch in "([{") - (ch in ")]}")
        if ch in ".!?" and depth == 0 and (i + 1 == len(text) or re.match(r" [A-Z]", text[i + 1:i + 3])):
            return text[:i + 1]
    return text


def _cmd_objectives(args) -> int:
    import textwrap

    from .objectives import OBJECTIVES

    width = min(shutil.get_terminal_size().columns, 110)
    for name, cls in sorted(OBJECTIVES.items()):
        doc = cls.__doc__ or sys.modules[cls.__module__].__doc__
        print(textwrap.fill(first_sentence(doc), width, initial_indent=f"{name:10s}", subsequent_indent=" " * 10,
                            break_on_hyphens=False))
    return 0


def add_parser(sub) -> None:
    p = add_config_command(
        sub, "distill", help="distil a teacher into a student (config + key.sub=value overrides)",
        description="Train a student as the config says and save it to training.output_dir/student; the run\n"
        "directory also gets mtakd_run.json, log_history.json and losses.png (the loss components per step).",
        config_help="run config with the sections teacher, student, data, objective, training, eval (see configs/ "
        "and the README); data files it names relative to itself are found next to it",
    )
    p.add_argument("--dry-run", action="store_true", help="run every check that needs no weights (data files "
                   "parse, layer map, width targets) and print the resolved config as JSON; loads no weights (a data "
                   "file not written yet is a warning)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the latest checkpoint of training.output_dir (or the one given; an argument "
                   "with '=' is read as an override)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in training.output_dir")
    p.set_defaults(func=_cmd_distill)

    o = sub.add_parser("objectives", help="list the registered base objectives")
    o.set_defaults(func=_cmd_objectives)
