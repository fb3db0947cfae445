"""What several units and studies share, built once: the pruned and pretrained students, DistiLLM-2's pairs,
teacher caches."""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from pathlib import Path

from .plan import (BUDGETS, EVAL_SETS, MTA, PRETRAIN_FILE, PRETRAINED_CONFIG, PRUNED_CONFIG, REPO, SHARED_DATA,
                   TRAIN_FILE, mta_section)
from .steps import _fmt_s, _read_json


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
    responses (:func:`build_pairs`) and the teacher caches of the distillation rows (``mtakd cache-teacher`` with
    the key layers of the budget's student; rows without MTA read a subset of it): one for the rows on the training
    data, one for DistiLLM-2's pairs (with base distillm2: both sequences of each pair)."""
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
        # the cache holds the teacher layers of the student's key layers: built from the SKL+MTA row's config (a
        # DistiLLM-2 row's: its pairs, each pair's two sequences cached)
        ref = next(c for _, _, c in units if c.teacher.cache == cache)
        d = ref.model_dump(mode="json")
        base = "distillm2" if ref.objective.base == "distillm2" else "skl"
        d["objective"] = {"base": base, "mta": mta_section(MTA, BUDGETS[args.budget].get("student", "selected"))}
        d["teacher"].pop("cache")
        print(f"building the teacher cache {cache} ...", flush=True)
        start = time.perf_counter()
        try:
            stale = _read_json(Path(cache) / "manifest.json").get("format", FORMAT) != FORMAT  # (else: resume a build)
            build_cache(build_config(d), cache, progress=False, overwrite=stale)
        finally:
            lock.unlink(missing_ok=True)
        print(f"    done in {_fmt_s(time.perf_counter() - start)}", flush=True)
