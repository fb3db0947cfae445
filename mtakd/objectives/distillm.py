"""DistiLLM (Ko et al., ICML 2024, "DistiLLM: Towards Streamlined Distillation for Large Language Models"):
skew KL (or skew reverse KL) on *adaptive off-policy student-generated outputs* (SGO).

    SKL_α = KL(p ‖ α·p + (1−α)·q)        SRKL_α = KL(q ‖ α·q + (1−α)·p)        α = objective.skew_alpha (0.1)
    L_base = (1 − kd_ratio)·CE + kd_ratio·mean over response tokens of SKL_α (or SRKL_α)

Adaptive SGO, following the official trainer (jongwooko/distillm, ``finetune.py``, type ``adaptive-*``):

- An SGO probability θ starts at ``init_threshold`` (0). After every evaluation, if the validation loss
  (the student's cross-entropy on the validation references, ``eval_loss_ce``) rose by at least
  ``loss_eps`` (0.1) over the last reference value, θ ← min(θ + 0.1, 1) and the reference becomes the
  new loss. The first evaluation only sets the reference (the official code evaluates once before
  training: set ``training.extra_args.eval_on_start: true`` for the same behaviour). Without
  validation data (``data.validation`` or ``data.validation_size``) θ stays at ``init_threshold``.
- Every training micro-batch draws u ~ U(0, 1). With θ_t = θ·(1 − step/total) (``replay_ratio:
  decreasing``, default; ``constant``: θ/2, ``increasing``: θ·step/total):
  u < θ_t, or u < θ while the replay buffer holds fewer than ``capacity`` (1000) samples → the batch's
  prompts are answered by the current student (``generate``, batched, left-padded, sampling with
  temperature 1, top-p 1, no top-k, at most ``data.max_length − data.max_prompt_length`` new tokens),
  the generated responses replace the reference responses (labels re-masked to the new response),
  the samples are pushed to the buffer and the step trains on them;
  else u < θ → the step trains on ``batch size`` samples drawn uniformly from the buffer (replay);
  otherwise the step trains on the dataset batch.
- The buffer (a FIFO of ``capacity`` samples), θ, the reference loss and the draw RNG are saved in every
  checkpoint (``distillm_state-rank{R}.json``, written with the RNG states while the checkpoint is staged)
  and restored by ``--resume``.

Documented choices (docs/objectives.md):

- A generated response is decoded and re-encoded with the tokenizer, then followed by EOS when the
  student stopped with EOS. Its tokens thus come with exact character offsets, so MTA's word and
  phrase spans are built for it the same way as for dataset responses: the response is parsed with
  the run's spaCy pipeline (words, noun/verb phrases; :mod:`mtakd.spans`) and mapped onto the tokens;
  the prompt's spans are kept from the batch. Re-encoding differs from the sampled ids only where the
  sampler produced a non-canonical tokenization. (The official code trains on the raw sampled ids and
  drops the EOS.)
- The draws use a dedicated RNG seeded with ``training.seed`` and identical on every process, so all
  data-parallel ranks take the same branch (needed for ZeRO-3 generation).
- Logged: ``loss_sgo`` (fraction of steps trained on student outputs, generated or replayed) and
  ``loss_sgo_threshold`` (θ).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections import deque
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from .base import TokenDivergence, register
from .gjsd import kl, log_mixture

log = logging.getLogger(__name__)
STATE_FILE = "distillm_state-rank{rank}.json"


class DistiLLMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    divergence: Literal["skl", "srkl"] = Field("skl", description="skew KL or skew reverse KL (α = skew_alpha)")
    student_generation: bool = Field(True, description="adaptive off-policy student-generated outputs")
    init_threshold: float = Field(0.0, ge=0, le=1, description="initial SGO probability θ")
    threshold_step: float = Field(0.1, gt=0, le=1, description="θ increase when the validation loss rises")
    loss_eps: float = Field(0.1, ge=0, description="validation-loss rise that triggers an increase of θ")
    capacity: int = Field(1000, gt=0, description="replay buffer size (samples)")
    replay_ratio: Literal["decreasing", "constant", "increasing"] = "decreasing"
    max_new_tokens: int | None = Field(None, gt=0, description="default: data.max_length − data.max_prompt_length")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0: no top-k")
    validation_loss: Literal["ce", "total"] = Field("ce", description="eval_loss_ce (official) or eval_loss")


# --------------------------------------------------------------------------------- SGO decision
def sgo_decision(u: float, threshold: float, progress: float, buffer_len: int, capacity: int, replay_ratio: str) -> str:
    """"generate", "replay" or "data" for a draw u ~ U(0,1) (the official trainer's rule)."""
    if replay_ratio == "constant":
        sample_threshold = threshold * 0.5
    elif replay_ratio == "increasing":
        sample_threshold = threshold * progress
    else:
        sample_threshold = threshold * (1 - progress)
    if u < sample_threshold or (u < threshold and buffer_len < capacity):
        return "generate"
    if u < threshold:
        return "replay"
    return "data"


def membership_to_ranges(membership: torch.Tensor) -> list[np.ndarray]:
    """Per row, the ``[K', 2]`` token ranges of a batch's dense span membership ``[B, K, T]`` (empty spans dropped)."""
    m = membership.bool().cpu()
    t = m.shape[-1]
    has = m.any(-1)
    start = m.float().argmax(-1)
    end = t - m.flip(-1).float().argmax(-1)
    ranges = torch.stack([start, end], -1)
    return [ranges[i][has[i]].numpy().astype(np.int64) for i in range(m.shape[0])]


@register("distillm")
class DistiLLM(TokenDivergence):
    """DistiLLM: skew KL / skew reverse KL with adaptive off-policy student-generated outputs."""

    Options = DistiLLMOptions

    def __init__(self, cfg):
        super().__init__(cfg)
        self.threshold = self.opts.init_threshold
        self.prev_loss: float | None = None
        self.buffer: deque = deque(maxlen=self.opts.capacity)
        self.rng = random.Random(0)
        self.tokenizer = None
        self.data_cfg = None
        self.with_spans = False
        self._nlp = None
        self._last_mode = "data"
        self._training = False
        self._generation_s = 0.0

    def divergence(self, s_logp, t_logp):
        a = self.cfg.skew_alpha
        if self.opts.divergence == "skl":
            return kl(t_logp, log_mixture(t_logp, s_logp, a))
        return kl(s_logp, log_mixture(s_logp, t_logp, a))

    def teacher_cache_use(self) -> str:
        """Student-generated outputs do not exist before training: with SGO on, the teacher is loaded and scores
        the generated and replayed batches; dataset batches read the cache (docs/objectives.md)."""
        return "partial" if self.opts.student_generation else "full"

    def setup(self, run_cfg, tokenizer, student, teacher) -> None:
        self.tokenizer = tokenizer
        self.data_cfg = run_cfg.data
        self.with_spans = run_cfg.objective.mta_enabled
        self.rng = random.Random(run_cfg.training.seed)
        if self.opts.student_generation and not (run_cfg.data.validation or run_cfg.data.validation_size):
            log.warning("distillm: no validation data, so the SGO probability stays at init_threshold=%s",
                        self.opts.init_threshold)

    # -------------------------------------------------------------------------------- loss
    def __call__(self, student_out, teacher_out, batch):
        parts = super().__call__(student_out, teacher_out, batch)
        if self.opts.student_generation and self._training:
            parts["sgo"] = float(self._last_mode != "data")
            parts["sgo_threshold"] = float(self.threshold)
            parts["generation_s"] = self._generation_s  # logged as loss_generation_s: the step's sampling time
        return parts

    # ---------------------------------------------------------------------- adaptive schedule
    def update_threshold(self, val_loss: float | None) -> None:
        """After an evaluation: raise θ when the validation loss rose by ≥ loss_eps over the reference."""
        if val_loss is None:
            return
        if self.prev_loss is None:
            self.prev_loss = float(val_loss)
        elif val_loss >= self.prev_loss + self.opts.loss_eps:
            self.threshold = min(self.threshold + self.opts.threshold_step, 1.0)
            self.prev_loss = float(val_loss)
        log.info("distillm: validation loss %.4f, SGO probability %.2f", val_loss, self.threshold)

    def prepare_inputs(self, trainer, model, inputs):
        self._last_mode = "data"
        self._generation_s = 0.0
        self._training = model.training
        if not (model.training and self.opts.student_generation):
            return inputs
        if self.tokenizer is None:
            raise RuntimeError("distillm: call objective.setup(run_cfg, tokenizer, student, teacher) before training")
        progress = trainer.state.global_step / max(trainer.state.max_steps, 1)
        mode = sgo_decision(self.rng.random(), self.threshold, progress, len(self.buffer), self.opts.capacity,
                            self.opts.replay_ratio)
        n = inputs["input_ids"].shape[0]
        if mode == "replay" and len(self.buffer) < n:
            mode = "generate"
        if mode == "data":
            return inputs
        self._last_mode = mode
        if mode == "generate":
            start = time.perf_counter()
            examples = self.generate_examples(trainer.accelerator.unwrap_model(model), inputs)
            self._generation_s = time.perf_counter() - start
            self.buffer.extend(examples)
        else:
            examples = self.rng.sample(list(self.buffer), n)
        return self.collate(examples, inputs["input_ids"].device)

    def collate(self, examples, device) -> dict:
        from ..data import Collator

        batch = Collator(self.tokenizer.pad_token_id)(examples)
        return {k: v.to(device) for k, v in batch.items()}

    # ------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def sample_responses(self, model, prompts: list[list[int]]) -> list[tuple[list[int], bool]]:
        """The student's sampled continuation of each prompt: (tokens before EOS, stopped with EOS)."""
        from transformers import GenerationConfig

        from ..decoding import eos_token_ids
        from ..models import padded_output_ids

        tok = self.tokenizer
        eos = eos_token_ids(model, tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
        max_new = self.opts.max_new_tokens or (self.data_cfg.max_length - self.data_cfg.max_prompt_length)
        gen_cfg = GenerationConfig(
            do_sample=True, temperature=self.opts.temperature, top_p=self.opts.top_p, top_k=self.opts.top_k,
            max_new_tokens=max_new, min_new_tokens=0, num_beams=1, eos_token_id=eos, pad_token_id=pad,
            repetition_penalty=1.0, no_repeat_ngram_size=0, suppress_tokens=padded_output_ids(model, tok) or None,
        )
        device = next(model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        was_training = model.training
        model.eval()
        try:
            seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg)
        finally:
            model.train(was_training)
        out = []
        for row in seqs[:, width:].tolist():
            stop = next((k for k, t in enumerate(row) if t in eos), None)
            out.append((row if stop is None else row[:stop], stop is not None))
        return out

    def generate_examples(self, model, inputs) -> list:
        """The batch's prompts answered by the student, as tokenised examples (with spans when MTA is on)."""
        from ..data import Example
        from ..spans import char_to_token_spans

        input_ids, labels, attn = inputs["input_ids"].cpu(), inputs["labels"].cpu(), inputs["attention_mask"].cpu()
        prompts, n_prompts = [], []
        for i in range(input_ids.shape[0]):
            resp = torch.nonzero(labels[i].ne(-100)).flatten()
            n = int(resp[0]) if len(resp) else int(attn[i].sum())
            prompts.append(input_ids[i, :n].tolist())
            n_prompts.append(n)
        responses = self.sample_responses(model, prompts)
        texts = [self.tokenizer.decode(tokens, skip_special_tokens=True) for tokens, _ in responses]
        prompt_spans = {}
        units = None
        if self.with_spans:
            for gran in ("word", "phrase"):
                key = f"{gran}_spans"
                prompt_spans[gran] = (membership_to_ranges(inputs[key]) if key in inputs
                                      else [np.zeros((0, 2), np.int64)] * len(prompts))
            units = self._parse(texts)
        eos = self.tokenizer.eos_token_id
        examples = []
        for i, (text, (_, stopped)) in enumerate(zip(texts, responses)):
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            resp_ids = list(enc["input_ids"])
            offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
            if stopped and eos is not None:
                resp_ids.append(eos)
                offsets = np.vstack([offsets, [[0, 0]]])
            n = n_prompts[i]
            ids = (prompts[i] + resp_ids)[: self.data_cfg.max_length]
            labs = ([-100] * n + resp_ids)[: len(ids)]
            spans = {}
            if units is not None:
                for gran in ("word", "phrase"):
                    pr = prompt_spans[gran][i]
                    pr = pr[pr[:, 1] <= n]
                    chars = np.asarray(getattr(units[i], gran + "s"), dtype=np.int64).reshape(-1, 2)
                    rs = np.clip(char_to_token_spans(chars, offsets) + n, 0, len(ids))
                    rs = rs[rs[:, 1] > rs[:, 0]]
                    spans[gran] = np.concatenate([pr, rs]).astype(np.int64)
            examples.append(Example(ids, labs, spans))
        return examples

    def _parse(self, texts: list[str]):
        """Words and phrases of generated responses (spaCy, not cached: each text is new)."""
        from ..spans import extract_units, load_spacy

        if self._nlp is None:
            self._nlp = load_spacy(self.data_cfg.spacy_model)
        return [extract_units(doc) for doc in self._nlp.pipe(texts)]

    # ------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        v, internal, gauss = self.rng.getstate()
        return {
            "version": 1, "threshold": self.threshold, "prev_loss": self.prev_loss,
            "rng": [v, list(internal), gauss],
            "buffer": [
                {"input_ids": list(map(int, e.input_ids)), "labels": list(map(int, e.labels)),
                 "spans": {g: np.asarray(r).tolist() for g, r in e.spans.items()}}
                for e in self.buffer
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        from ..data import Example

        self.threshold = float(state["threshold"])
        self.prev_loss = state["prev_loss"]
        v, internal, gauss = state["rng"]
        self.rng.setstate((v, tuple(internal), gauss))
        self.buffer = deque(
            (Example(e["input_ids"], e["labels"],
                     {g: np.asarray(r, dtype=np.int64).reshape(-1, 2) for g, r in e["spans"].items()})
             for e in state["buffer"]),
            maxlen=self.opts.capacity,
        )

    def save_state(self, directory: str, rank: int = 0) -> str | None:
        if not self.opts.student_generation:
            return None
        path = os.path.join(directory, STATE_FILE.format(rank=rank))
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.state_dict(), fh, separators=(",", ":"))
        os.replace(tmp, path)
        return path

    def load_state(self, directory: str, rank: int = 0) -> bool:
        if not self.opts.student_generation:
            return False
        path = os.path.join(directory, STATE_FILE.format(rank=rank))
        if not os.path.isfile(path):
            log.warning("distillm: %s holds no SGO state; continuing with an empty replay buffer", directory)
            return False
        with open(path, encoding="utf-8") as fh:
            self.load_state_dict(json.load(fh))
        log.info("distillm: restored SGO state from %s (θ=%.2f, %d buffered samples)", path, self.threshold,
                 len(self.buffer))
        return True

    def callbacks(self) -> list:
        return [_callback(self)] if self.opts.student_generation else []


def _callback(objective: DistiLLM):
    """A TrainerCallback adapting θ after each evaluation (the SGO state itself travels in checkpoints via
    save_state/load_state). Built lazily: importing the objectives must not import the Trainer."""
    from transformers import TrainerCallback

    class DistiLLMCallback(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            metrics = metrics or {}
            key = "eval_loss_ce" if objective.opts.validation_loss == "ce" else "eval_loss"
            objective.update_threshold(metrics.get(key, metrics.get("eval_loss")))

    return DistiLLMCallback()
