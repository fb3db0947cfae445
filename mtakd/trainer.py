"""A thin :class:`transformers.Trainer` that distils: only ``compute_loss`` (and the projector param group)
change; accumulation, mixed precision, accelerate/DeepSpeed/FSDP, checkpoints and logging are the
Trainer's own."""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import types
from collections import defaultdict

import torch
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .errors import NonFiniteLossError  # noqa: F401  (raised here; the CLI reports it as a user-facing error)
from .mta.loss import PROJECTORS, MTALoss
from .objectives import Objective
from .models import forward_last_hidden, head_reproduces, no_progress_bars, plain_head, unwrap
from .objectives.base import CachedLogProbs, HiddenHead

logger = logging.getLogger(__name__)
SPAN_KEYS = ("word_spans", "phrase_spans")
CROSS_KEYS = ("teacher_input_ids", "teacher_attention_mask", *(f"teacher_{k}" for k in SPAN_KEYS))
PROJECTORS_FILE = "mta_projectors.safetensors"  # beside a LoRA adapter in checkpoints


class DistillTrainer(Trainer):
    """``L = L_base + λ_DSA·L_DSA + λ_Hid·L_Hid``; every component is logged separately.

    Reduction: ``compute_loss`` returns the mean over one micro-batch (token mean for the base objective,
    sequence mean for MTA), so the Trainer divides it by the gradient-accumulation steps and DDP/DeepSpeed/
    FSDP average gradients over processes: a step optimises the mean of its micro-batch means. That equals
    the loss of the whole global batch exactly when micro-batches hold equally many response tokens (see
    docs/scaling.md); it does not depend on batches being unchanged by ``Objective.prepare_inputs``.
    """

    # our loss is a per-micro-batch mean: the Trainer must divide it by the accumulation steps (transformers
    # would otherwise assume a loss normalised by num_items_in_batch, since HF causal LMs accept loss kwargs)
    loss_is_scaled_for_ga = False

    def __init__(self, *args, teacher=None, objective: Objective, mta: MTALoss | None = None,
                 projector_lr: float = 5e-4, on_nonfinite: str = "stop", teacher_cache=None, **kwargs):
        """``teacher_cache``: a :class:`mtakd.teacher_cache.TeacherCache`; batches that carry ``cache_index`` read
        the teacher's signals from it, other batches (e.g. student-generated ones) run ``teacher``."""
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.teacher_cache = teacher_cache
        self.mta = mta
        self.projector_lr = projector_lr
        self.on_nonfinite = on_nonfinite
        if self.is_deepspeed_enabled:
            check_deepspeed_optimizer(self.accelerator.state.deepspeed_plugin.deepspeed_config,
                                      has_projectors=getattr(self.model, PROJECTORS, None) is not None)
        self.teacher = self._prepare_teacher(teacher) if teacher is not None else None
        self._teacher_spread = teacher is not None and _spread(teacher)  # teacher.device_map over several devices
        self._skip_update = False  # on_nonfinite=skip: the optimiser update of this step is dropped
        self._fuse: bool | None = None  # LM heads fused into the chunked loss (decided at the first batch)
        self._heads_checked = False
        self._components = {True: defaultdict(list), False: defaultdict(list)}
        for callback in objective.callbacks():  # e.g. an objective state saved with checkpoints
            self.add_callback(callback)
        for plain, numeric in ((ProgressCallback, _NumericProgressCallback), (PrinterCallback, _NumericPrinterCallback)):
            if self.pop_callback(plain) is not None:  # logged numbers as numbers, not strings
                self.add_callback(numeric)

    # ------------------------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = self.objective.prepare_inputs(self, model, inputs)
        spans = {k: inputs.pop(k) for k in SPAN_KEYS if k in inputs}
        mta_rows = inputs.pop("mta_rows", None)  # MTA on the first n rows only (e.g. DistiLLM-2's pairs)
        # dataset batches of a cached run carry their examples' indices; a batch the objective replaced does not
        cache_index, cache_split = inputs.pop("cache_index", None), inputs.pop("cache_split", None)
        need_hidden = self.mta is not None or self.objective.needs_hidden_states
        fwd = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        # objective.cross_tokenizer: the teacher reads its own tokenisation of the text (its ids, mask and spans);
        # ``teacher_labels`` stay in the batch for the base (e.g. ULD's teacher response positions)
        teacher_side = {k[len("teacher_"):]: inputs.pop(k) for k in CROSS_KEYS if k in inputs} or None
        t_fwd = fwd if teacher_side is None else dict(
            input_ids=teacher_side["input_ids"], attention_mask=teacher_side["attention_mask"], use_cache=False)
        want_teacher = self.objective.needs_teacher or self.mta is not None
        fuse = self._fuse_heads()
        s_out = self._forward(model, fwd, need_hidden, fuse)
        t_out = self._teacher_outputs(t_fwd, inputs, cache_index, cache_split, need_hidden) if want_teacher else None
        if fuse and not self._heads_checked and not self._heads_agree(model, s_out, t_out):
            s_out = self._forward(model, fwd, need_hidden, False)  # this batch again, with full logits
            t_out = self._teacher_outputs(t_fwd, inputs, cache_index, cache_split, need_hidden) if want_teacher else None
            fuse = False
        models = {"student": model, "teacher": self.teacher} if self.objective.needs_models else {}
        s_view, t_view = s_out, t_out
        if fuse:  # the objective computes the logits chunk by chunk from the last hidden states (docs/scaling.md)
            s_view = _hidden_view(model, s_out)
            if t_out is not None and not isinstance(t_out.logits, CachedLogProbs):
                t_view = _hidden_view(self.teacher, t_out)
        parts = self.objective(s_view, t_view, inputs, **models)
        loss = parts.pop("loss")
        logged = {"base": loss.detach(), **parts}
        if self.mta is not None:
            projectors = getattr(self.accelerator.unwrap_model(model), PROJECTORS, None)  # None when λ_Hid = 0
            rows = slice(None) if mta_rows is None else slice(0, int(mta_rows))
            mta_parts = self.mta(
                tuple(h[rows] for h in s_out.hidden_states),
                tuple(None if h is None else h[rows] for h in t_out.hidden_states),  # a cache holds the key layers only
                inputs["attention_mask"][rows], spans, projectors,
                teacher_weights=None if getattr(t_out, "importance", None) is None else t_out.importance[:, rows],
                **({} if teacher_side is None else dict(
                    teacher_attention_mask=teacher_side["attention_mask"][rows],
                    teacher_spans={k: teacher_side[k][rows] for k in SPAN_KEYS if k in teacher_side})),
            )
            loss = loss + self.mta.total(mta_parts)
            logged.update({k: v.detach() for k, v in mta_parts.items()})
        if not self._is_finite(loss, logged):  # on_nonfinite=skip: zero gradients, and the update is dropped
            # the value stays non-finite (the Trainer's logging_nan_inf_filter then logs the running mean, not 0)
            loss = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0 + loss.detach()
            self._skip_update = self._skip_update or model.training
        store = self._components[model.training]
        for k, v in logged.items():
            store[k].append(float(v))
        return (loss, s_out) if return_outputs else loss

    # ------------------------------------------------------------------------- fused LM heads
    def _fuse_heads(self) -> bool:
        """Whether the LM heads are fused into the chunked loss: the objective takes a :class:`HiddenHead`,
        ``objective.chunk_size > 0``, not under FSDP or DeepSpeed ZeRO-3 (which own the head's full parameters only
        inside the model's forward), and both models accept ``logits_to_keep`` with a plain head (no logit soft-capping or
        scaling). Decided once; :meth:`_heads_agree` may still turn it off at the first batch."""
        if self._fuse is None:
            obj = self.objective
            models = [self.model] + ([self.teacher] if self.teacher is not None else [])
            zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
            self._fuse = bool(obj.accepts_hidden_head and obj.cfg.chunk_size > 0 and not self.is_fsdp_enabled
                              and not zero3 and all(plain_head(m) for m in models)
                              and not self._teacher_spread)
        return self._fuse

    def _forward(self, model, fwd, need_hidden, fuse):
        """The model's outputs; fused: only the last position's logits, and every layer's hidden state when
        ``need_hidden`` (MTA, an objective that reads them), else only the last one (``hidden_states`` a 1-tuple:
        :func:`mtakd.models.forward_last_hidden`)."""
        if not fuse:
            return model(**fwd, output_hidden_states=need_hidden)
        if need_hidden:
            return model(**fwd, output_hidden_states=True, logits_to_keep=1)
        return forward_last_hidden(model, **fwd)

    def _heads_agree(self, model, s_out, t_out) -> bool:
        """At the first fused batch: the LM head applied to the last hidden state reproduces the logits the model
        returned (its last position). If not (a head the model post-processes), fusing is turned off for the run."""
        self._heads_checked = True
        pairs = [(model, s_out)]
        if t_out is not None and not isinstance(t_out.logits, CachedLogProbs):
            pairs.append((self.teacher, t_out))
        with torch.no_grad():
            for m, out in pairs:
                if not head_reproduces(m, out.hidden_states[-1][:, -1], out.logits[:, -1]):
                    logger.warning("the LM head of %s does not reproduce its logits from the last hidden state: "
                                   "the chunked loss reads full logits instead", type(unwrap(m)).__name__)
                    self._fuse = False
                    return False
        return True

    def _teacher_outputs(self, fwd, inputs, cache_index, cache_split, need_hidden):
        """The teacher's outputs for this batch: read from the teacher cache when the batch carries its examples'
        indices, else the teacher's forward pass (None without a teacher)."""
        if self.teacher_cache is not None and cache_index is not None:
            return self.teacher_cache.fetch(cache_split, cache_index, inputs["attention_mask"], inputs["labels"])
        if self.teacher is None:
            if self.teacher_cache is not None:
                raise RuntimeError(
                    f"base {self.objective.name!r} replaced a batch by sequences that are not in the teacher cache, "
                    "and the teacher is not loaded (its teacher_cache_use() must be 'partial')")
            return None
        with torch.no_grad():
            out = self._forward(self.teacher, fwd, need_hidden, bool(self._fuse))  # as the student's
        return _on_device(out, fwd["input_ids"].device) if self._teacher_spread else out

    def _is_finite(self, loss, logged) -> bool:
        if torch.isfinite(loss):
            return True
        bad = [k for k, v in logged.items() if not math.isfinite(float(v))] or ["total"]
        msg = f"non-finite loss at step {self.state.global_step + 1}: component(s) {', '.join(bad)} " + str(
            {k: float(v) for k, v in logged.items()}
        )
        if self.on_nonfinite == "stop":
            raise NonFiniteLossError(msg + "; the last saved checkpoint is intact (set training.on_nonfinite=skip to skip such steps)")
        logger.warning("%s; skipping the step", msg)
        return False

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        training = "loss" in logs
        store = self._components[training]
        if training or "eval_loss" in logs:
            prefix = "" if training else "eval_"
            means = self._mean_over_processes({k: sum(v) / len(v) for k, v in store.items() if v})
            for k, v in means.items():
                logs[f"{prefix}loss_{k}"] = round(v, 6)
            store.clear()
        super().log(logs, *args, **kwargs)

    def _mean_over_processes(self, values: dict[str, float]) -> dict[str, float]:
        """Components averaged over all processes (every rank logs at the same steps with the same keys)."""
        if self.accelerator.num_processes <= 1 or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
        return dict(zip(keys, self.accelerator.reduce(t, reduction="mean").tolist()))

    # ------------------------------------------------------------------------------- placement
    def _prepare_teacher(self, teacher):
        """The teacher is frozen (eval mode, no gradients) and never handed to the optimiser. Under DeepSpeed it
        becomes an inference engine of its own, sharded with ZeRO-3 like the student and a full replica
        otherwise (TRL's ``prepare_deepspeed`` convention for reference/teacher models); elsewhere accelerate
        places it on each process's device with the run's autocast, without a DDP wrapper."""
        teacher.eval().requires_grad_(False)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed_teacher(teacher, self.accelerator)
        if getattr(teacher, "hf_device_map", None):  # spread over devices with device_map: leave it there
            return teacher
        teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        if self.is_fsdp_enabled:  # accelerate leaves placement to FSDP, which only wraps the student
            teacher.to(self.accelerator.device)
        return teacher

    # ---------------------------------------------------------------------- projector param group
    def create_optimizer(self, *args, **kwargs):
        opt = super().create_optimizer(*args, **kwargs)
        projectors = getattr(self.accelerator.unwrap_model(self.model), PROJECTORS, None)
        if projectors is not None and not any(g.get("mtakd_projectors") for g in opt.param_groups):
            ids = {id(p) for p in projectors.parameters()}
            for g in opt.param_groups:
                g["params"] = [p for p in g["params"] if id(p) not in ids]
            opt.param_groups[:] = [g for g in opt.param_groups if g["params"]]
            opt.add_param_group(
                {"params": list(projectors.parameters()), "lr": self.projector_lr, "weight_decay": 0.0,
                 "mtakd_projectors": True}
            )
        if not getattr(opt, "_mtakd_guarded", False):
            unguarded = opt.step

            def guarded_step(optimizer, *args, **kwargs):
                """``optimizer.step`` that drops the update of a step whose loss was not finite (on_nonfinite=skip),
                so parameters and optimiser moments stay untouched (AdamW would otherwise still move them with
                zero gradients). Not used by DeepSpeed, whose engine steps its own optimiser."""
                return None if self._drop_this_update() else unguarded(*args, **kwargs)

            # a bound method, as torch's LR schedulers expect (they wrap ``optimizer.step.__func__``)
            opt.step = types.MethodType(guarded_step, opt)
            opt._mtakd_guarded = True
        return opt

    def _drop_this_update(self) -> bool:
        """True when the update of this step must be dropped: on_nonfinite=skip saw a non-finite loss on any
        process (all processes then drop it together). Resets the flag."""
        skip = self._skip_update
        self._skip_update = False
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([float(skip)], device=self.accelerator.device)
            skip = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        if skip:
            logger.warning("step %d: optimiser update skipped (non-finite loss)", self.state.global_step + 1)
        return skip

    # ------------------------------------------------------------------------------ checkpoints
    def _save_rng_state(self, output_dir: str) -> None:
        """Every process's RNG state, and the objective's own state next to it (e.g. DistiLLM's replay buffer):
        written inside the checkpoint being staged, so it is part of the atomic checkpoint."""
        super()._save_rng_state(output_dir)
        self.objective.save_state(output_dir, self.args.process_index)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is not None:
            self.objective.load_state(checkpoint, self.args.process_index)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The Trainer's save, plus the projectors beside a LoRA adapter (an adapter file holds only the
        adapter; a full model's weights already include ``mta_projectors``). Without transformers' "Writing model
        shards" bars, which would interleave with the training log."""
        with no_progress_bars():
            super()._save(output_dir, state_dict)
        projectors = self._adapter_projectors()
        if projectors is not None and self.args.should_save:
            from safetensors.torch import save_file

            out = output_dir if output_dir is not None else self.args.output_dir
            save_file({k: v.detach().cpu().contiguous() for k, v in projectors.state_dict().items()},
                      os.path.join(out, PROJECTORS_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        projectors = self._adapter_projectors()
        path = os.path.join(resume_from_checkpoint, PROJECTORS_FILE)
        if projectors is not None and os.path.isfile(path):
            from safetensors.torch import load_file

            projectors.load_state_dict(load_file(path))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """The Trainer's load, then each param group's learning rate from the schedule built for this run at the
        resumed step. The optimizer state holds the rate its last step ran at; when the run was extended
        (a larger ``training.max_steps``) the rebuilt schedule differs, e.g. a finished cosine run saved LR 0 and
        its first extended step would otherwise not move any weight (see docs/scaling.md)."""
        super()._load_optimizer_and_scheduler(checkpoint)
        sched = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)  # accelerate's AcceleratedScheduler
        if checkpoint is None or not hasattr(sched, "lr_lambdas"):
            return
        lrs = [base * fn(sched.last_epoch) for fn, base in zip(sched.lr_lambdas, sched.base_lrs)]  # as LambdaLR
        for group, lr in zip(sched.optimizer.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = lrs

    def _issue_warnings_after_load(self, load_result) -> None:
        """The Trainer warns about every missing key; a tied weight (e.g. ``lm_head.weight`` = the embeddings) is
        stored once, so its absence from a checkpoint is expected: only genuinely missing keys are reported."""
        shared = defaultdict(list)
        for name, p in self.model.named_parameters(remove_duplicate=False):
            shared[id(p)].append(name)
        missing = set(load_result.missing_keys)
        tied = {n for names in shared.values() if not set(names) <= missing for n in names if n in missing}
        if tied:
            logger.info("tied weight(s) %s are stored once in the checkpoint, under their tied name", sorted(tied))
        super()._issue_warnings_after_load(
            types.SimpleNamespace(missing_keys=[k for k in load_result.missing_keys if k not in tied],
                                  unexpected_keys=list(load_result.unexpected_keys))
        )

    def _adapter_projectors(self):
        """The projectors of a PEFT (adapter) student, else None."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        return getattr(unwrapped, PROJECTORS, None) if hasattr(unwrapped, "peft_config") else None

    def _save_checkpoint(self, model, trial) -> None:
        """Checkpoints are written to ``tmp-checkpoint-N`` and renamed to ``checkpoint-N`` once complete, so a
        kill during the save never leaves a ``checkpoint-N`` that ``--resume`` would trust (the Trainer writes
        straight into ``checkpoint-N``). Everything else (what is saved, rotation) is the Trainer's own."""
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, f"tmp-{name}")
        if self.args.should_save and os.path.isdir(staging):
            shutil.rmtree(staging)  # left by a run killed while saving this step
        self.accelerator.wait_for_everyone()
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # rotate once the rename is done
        real_output_dir = self._get_output_dir
        self._get_output_dir = lambda trial=None: staging  # super() writes into staging/checkpoint-N
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._get_output_dir = real_output_dir
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank has written its part (RNG states, shards)
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.isdir(final):  # saving the same step again (e.g. resumed from an older checkpoint)
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            _fsync_dir(run_dir)
            shutil.rmtree(staging, ignore_errors=True)
            if self.state.best_model_checkpoint and self.state.best_model_checkpoint.startswith(staging):
                self.state.best_model_checkpoint = final  # this step is the best: record where it now lives
                self.state.save_to_json(os.path.join(final, TRAINER_STATE_NAME))
            rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()


def _shown(logs: dict) -> dict:
    """A log line's numbers as numbers rounded to 4 significant digits (``'loss': 7.393``; transformers formats them
    as strings, ``'loss': '7.393'``)."""
    return {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in logs.items() if k != "total_flos"}


class _NumericProgressCallback(ProgressCallback):
    """The Trainer's progress bar, its log lines written by :func:`_shown`."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None:
            self.training_bar.write(str(_shown(logs)))


class _NumericPrinterCallback(PrinterCallback):
    """The Trainer's log lines without a progress bar (``disable_tqdm``), written by :func:`_shown`."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and logs is not None:
            print(_shown(logs))


def _hidden_view(model, out):
    """``out`` with a :class:`HiddenHead` (last hidden state, LM head) in place of its logits."""
    head = unwrap(model).get_output_embeddings()
    return types.SimpleNamespace(logits=HiddenHead(out.hidden_states[-1], head), hidden_states=out.hidden_states)


def _spread(model) -> bool:
    """The model was loaded with a ``device_map`` over more than one device (``teacher.device_map``)."""
    return len({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}) > 1


def _on_device(out, device):
    """A device-mapped teacher's outputs on the batch's device: its logits come from the last device's head and its
    hidden states from the devices of their layers (the losses and MTA combine them with the student's)."""
    if out.logits is not None:
        out.logits = out.logits.to(device)
    if out.hidden_states is not None:
        out.hidden_states = tuple(h.to(device) for h in out.hidden_states)
    return out


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_deepspeed_optimizer(ds_config: dict, has_projectors: bool) -> None:
    """A DeepSpeed config with its own ``optimizer`` section makes DeepSpeed build the optimiser from every
    trainable parameter in one group: the projectors' own param group (``mta.projector_lr``, no weight decay,
    MTA_SPEC §7) would be silently lost. Stop instead."""
    if has_projectors and ds_config.get("optimizer"):
        from .config import ConfigError

        raise ConfigError(
            "the DeepSpeed config has an `optimizer` section: DeepSpeed would then train the MTA projectors with the "
            "student's learning rate and weight decay instead of mta.projector_lr and no decay. Remove the section "
            "(the Trainer then builds AdamW from training.* with the projectors' own group, and DeepSpeed wraps it), "
            "or set objective.mta.lambda_hid=0 (no projectors)"
        )


def prepare_deepspeed_teacher(teacher, accelerator):
    """A frozen teacher as a DeepSpeed inference engine, the way TRL prepares reference/teacher models
    (``trl.models.utils.prepare_deepspeed``): with ZeRO-3 it is sharded like the student (bucket sizes tuned to
    its hidden size); with ZeRO-0/1/2 each GPU holds a full replica (stage 0). No optimiser or scheduler."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    stage = zero.get("stage", 0)
    sizes = getattr(teacher.config, "hidden_sizes", None)
    hidden = max(sizes) if sizes else getattr(teacher.config, "hidden_size", None)
    if stage == 3 and hidden:
        tuned = {"reduce_bucket_size": hidden * hidden, "stage3_param_persistence_threshold": 10 * hidden,
                 "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden)}
        for k, v in tuned.items():
            if zero.get(k, "auto") == "auto":
                zero[k] = v
    if stage != 3:
        zero["stage"] = 0
    engine, *_ = deepspeed.initialize(model=teacher, config=_drop_auto(config))
    engine.eval()
    return engine


def _drop_auto(config: dict) -> dict:
    """DeepSpeed cannot read values left at "auto" (the Trainer fills them for the student's engine only)."""
    return {k: _drop_auto(v) if isinstance(v, dict) else v for k, v in config.items() if v != "auto"}
