"""A thin :class:`transformers.Trainer` that distils: only ``compute_loss`` (and the projector param group)
change; accumulation, mixed precision, accelerate/DeepSpeed/FSDP, checkpoints and logging are the
Trainer's own."""

from __future__ import annotations

import logging
import math
from collections import defaultdict

import torch
from transformers import Trainer

from .mta.loss import PROJECTORS, MTALoss
from .objectives import Objective

logger = logging.getLogger(__name__)
SPAN_KEYS = ("word_spans", "phrase_spans")


class NonFiniteLossError(FloatingPointError):
    pass


class DistillTrainer(Trainer):
    """``L = L_base + λ_DSA·L_DSA + λ_Hid·L_Hid``; every component is logged separately."""

    def __init__(self, *args, teacher=None, objective: Objective, mta: MTALoss | None = None,
                 projector_lr: float = 5e-4, on_nonfinite: str = "stop", **kwargs):
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.mta = mta
        self.projector_lr = projector_lr
        self.on_nonfinite = on_nonfinite
        self.teacher = teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            if not getattr(teacher, "hf_device_map", None):
                teacher.to(self.args.device)
        self._components = {True: defaultdict(list), False: defaultdict(list)}

    # ------------------------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        spans = {k: inputs.pop(k) for k in SPAN_KEYS if k in inputs}
        need_hidden = self.mta is not None or self.objective.needs_hidden_states
        fwd = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        s_out = model(**fwd, output_hidden_states=need_hidden)
        t_out = None
        if self.teacher is not None and (self.objective.needs_teacher or self.mta is not None):
            with torch.no_grad():
                t_out = self.teacher(**fwd, output_hidden_states=need_hidden)
        parts = self.objective(s_out, t_out, inputs)
        loss = parts.pop("loss")
        logged = {"base": loss.detach(), **parts}
        if self.mta is not None:
            projectors = getattr(self.accelerator.unwrap_model(model), PROJECTORS)
            mta_parts = self.mta(s_out.hidden_states, t_out.hidden_states, inputs["attention_mask"], spans, projectors)
            loss = loss + self.mta.total(mta_parts)
            logged.update({k: v.detach() for k, v in mta_parts.items()})
        if not self._is_finite(loss, logged):  # on_nonfinite=skip: a zero loss with zero gradients
            loss = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
        store = self._components[model.training]
        for k, v in logged.items():
            store[k].append(float(v))
        return (loss, s_out) if return_outputs else loss

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
            for k, vals in store.items():
                if vals:
                    logs[f"{prefix}loss_{k}"] = round(sum(vals) / len(vals), 6)
            store.clear()
        super().log(logs, *args, **kwargs)

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
        return opt
