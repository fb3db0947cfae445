"""Offline distillation: the teacher's signals computed once over the (fixed) training sequences and read by the
trainer instead of running the teacher (docs/teacher_cache.md).

``mtakd cache-teacher`` writes, per example of the training (and validation) data of a run config:

- the teacher's next-token log-probabilities at the response positions, as the top-k values with their token
  ids (``--top-k``, default 64) or over the whole vocabulary (``--top-k 0``);
- MTA's teacher side (MTA_SPEC §2, §4): the hidden states at the teacher layers of the resolved key-layer map,
  at ``--dtype``, and the token importance weights w_t of each of those layers, computed by
  :meth:`mtakd.mta.MTALoss.teacher_importance` (the run's ``center_states`` / ``sigma`` switches) from the
  full-precision states, in float32.

Files: ``manifest.json`` (what the cache was built from: teacher source, its files' fingerprint on disk
(:func:`teacher_files_fingerprint`, checked on every use) and its weights' fingerprint, tokenizer,
template, data files' hashes, max lengths, layer map, top-k, dtype, mtakd version) and sharded safetensors,
``{split}-{shard:05d}.safetensors`` holding ``shard_size`` consecutive examples each. A shard is written to a
temporary file and renamed when complete, so an interrupted build keeps its finished shards and resumes after
them. Examples are addressed by their index in the run's dataset: :class:`IndexedDataset` and
:class:`IndexedCollator` pass ``cache_index`` / ``cache_split`` through each batch and
:meth:`TeacherCache.fetch` reads those entries (under DDP each process reads its own batches' entries). A base whose
dataset items hold several sequences (DistiLLM-2's pairs: ``Objective.sequences_per_example``) stores item i's
sequences as entries ``n·i … n·i + n − 1``, in its collator's row order (teacher response, then student response);
MTA's hidden states and importance weights are stored only for the first ``Objective.mta_sequences`` of them
(DistiLLM-2: the teacher response, the rows MTA aligns).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from .config import ConfigError, RunConfig, add_config_command

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 2  # 2: top-k caches store the teacher's leftover log-mass (`rest`)
SPLITS = ("train", "validation")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CacheMismatch(ConfigError):
    """A teacher cache that was built for another run (data, template, tokenizer, teacher, layer map, ...)."""


# ------------------------------------------------------------------------------------ fingerprints
def _sha256_tensors(items) -> str:
    h = hashlib.sha256()
    for name, t in items:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weights_fingerprint(model) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes and bytes)."""
    return _sha256_tensors(sorted(model.state_dict().items()))


def tokenizer_fingerprint(tok) -> str:
    """sha256 of the tokenizer's full definition (vocabulary, merges, normaliser, special tokens) and chat template."""
    backend = tok.backend_tokenizer.to_str() if getattr(tok, "backend_tokenizer", None) is not None else json.dumps(
        sorted(tok.get_vocab().items()))
    extra = json.dumps([getattr(tok, "chat_template", None), tok.eos_token, tok.pad_token], default=str)
    return hashlib.sha256((backend + extra).encode()).hexdigest()


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_fingerprint(cfg: RunConfig) -> dict:
    """Everything that decides the run's token sequences: the data files' contents (a hub dataset id by name),
    template, system prompt, max lengths and the sample / validation selection."""
    d = cfg.data

    def files(sources):
        return [{"sha256": _file_sha256(s)} if os.path.isfile(s) else {"hub_id": s} for s in sources]

    return {"train": files(d.train), "validation": files(d.validation), "template": d.template,
            "system_prompt": d.system_prompt, "max_prompt_length": d.max_prompt_length, "max_length": d.max_length,
            "max_samples": d.max_samples, "validation_size": d.validation_size}


def teacher_source(cfg: RunConfig) -> dict:
    t = cfg.teacher
    return {"source": t.describe(), "revision": t.revision, "dtype": t.dtype, "random_init": t.random_init,
            "config_overrides": t.config_overrides}


def teacher_files_fingerprint(cfg: RunConfig) -> dict:
    """What decides the teacher's weights, read from disk without loading the model (docs/teacher_cache.md):
    ``files``, the byte size and sha256 (streamed, 1 MiB at a time) of a local directory's ``config.json`` and
    every ``*.safetensors`` file, or of a GGUF file (a package's too); for a hub id the ``hub_commit`` the local
    Hugging Face cache resolves ``teacher.revision`` to (the run loads the tokenizer first, which updates it when
    online); for a ``random_init`` teacher the configuration's files only and the ``seed`` (``training.seed``)."""
    from .models import resolve_source

    t = cfg.teacher
    path, gguf = resolve_source(t)
    seed = {"seed": cfg.training.seed} if t.random_init else {}
    if gguf:
        files = [Path(path) / gguf]
    elif os.path.isdir(path):
        files = [Path(path) / "config.json"] + ([] if t.random_init else sorted(Path(path).glob("*.safetensors")))
    else:
        return {"hub_commit": _hub_commit(path, t.revision), **seed}
    return {"files": {f.name: {"bytes": f.stat().st_size, "sha256": _file_sha256(str(f))} for f in files
                      if f.is_file()}, **seed}


def _hub_commit(repo: str, revision: str | None) -> str | None:
    """The commit a hub model's ``revision`` (default ``main``) resolves to in the local Hugging Face cache, or
    ``revision`` itself when it is a commit hash; None when the model is not cached."""
    import re

    from huggingface_hub import try_to_load_from_cache

    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    found = try_to_load_from_cache(repo, "config.json", revision=revision)
    return Path(found).parent.name if isinstance(found, str) else None


def _fingerprint_changes(cached: dict, run: dict) -> list[str]:
    """What differs between two :func:`teacher_files_fingerprint` results, file by file."""
    changes = []
    for key in sorted(set(cached) | set(run)):
        a, b = cached.get(key), run.get(key)
        if a == b:
            continue
        if key == "files" and a is not None and b is not None:
            changes += [f"{n} " + ("changed" if n in a and n in b else "added" if n in b else "removed")
                        for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n)]
        else:
            changes.append(f"{key}: cache {json.dumps(a)}, run {json.dumps(b)}")
    return changes


def _importance_switches(mta) -> dict:
    return {"center_states": mta.center_states, "sigma": mta.sigma}


# --------------------------------------------------------------------------------- dataset plumbing
@dataclass(frozen=True)
class Indexed:
    """One dataset item with its split and index in that split (the key of its cache entry)."""

    split: str
    index: int
    item: object


def _sequences(item) -> tuple:
    """The token sequences of one dataset item, in its collator's row order: a DistiLLM-2 pair's two
    (:attr:`~mtakd.objectives.distillm2.PairExample.sequences`), else the item itself."""
    return getattr(item, "sequences", (item,))


def _has_states(index: torch.Tensor, per: int, mta: int) -> torch.Tensor:
    """Which cache entries (by index in their split) hold MTA's key-layer states: sequence j < ``mta`` of each item
    of ``per`` sequences."""
    return index % per < mta


def _entries(dataset) -> list:
    """The cache entries of a dataset: every item's sequences (:func:`_sequences`) in order — item i of n sequences
    is entries n·i … n·i + n − 1."""
    return [x for i in range(len(dataset)) for x in _sequences(dataset[i])]


class IndexedDataset(torch.utils.data.Dataset):
    """A dataset whose items carry their index, so the collator can tell the trainer which entries to read."""

    def __init__(self, dataset, split: str):
        self.dataset, self.split = dataset, split

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return Indexed(self.split, int(i), self.dataset[i])


class IndexedCollator:
    """The objective's collator plus ``cache_index`` (a long tensor, one cache entry per row of the batch) and
    ``cache_split``. Items of ``n`` sequences (:func:`_sequences`) are collated as ``n`` blocks of rows (DistiLLM-2's
    :class:`~mtakd.objectives.distillm2.PairCollator`: ``[2B, T]``, teacher responses first): row ``j·B + b`` is
    sequence j of item b, cache entry ``n·index + j``."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, items: list[Indexed]) -> dict:
        batch = self.collator([x.item for x in items])
        n = len(_sequences(items[0].item))
        index = torch.tensor([x.index for x in items], dtype=torch.long)
        batch["cache_index"] = (n * index[None] + torch.arange(n)[:, None]).flatten()
        batch["cache_split"] = items[0].split
        return batch


# ----------------------------------------------------------------------------------------- reading
class TeacherCache:
    """A finished cache directory: its manifest, and the entries of a batch as the teacher's outputs."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        path = self.dir / MANIFEST
        if not path.is_file():
            raise ConfigError(f"teacher.cache: {self.dir} holds no teacher cache ({MANIFEST} missing); build one with "
                              f"`mtakd cache-teacher --config CFG --out {self.dir}`")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ConfigError(f"teacher.cache: {self.dir} has cache format {self.manifest.get('format')}, this mtakd "
                              f"reads format {FORMAT} only; rebuild it with `mtakd cache-teacher --config CFG --out "
                              f"{self.dir} --overwrite` (docs/teacher_cache.md)")
        if not self.manifest.get("complete"):
            raise ConfigError(f"teacher.cache: {self.dir} is incomplete (the build was interrupted); run the same "
                              "`mtakd cache-teacher` command again to finish it")
        self.top_k = int(self.manifest["top_k"])
        self.teacher_layers = [int(t) for t in self.manifest["layers"]["teacher_layers"]]
        # sequences per dataset item, and how many of them (the first) hold MTA's states (absent: all)
        self.per = int(self.manifest.get("sequences_per_example", 1))
        self.mta_per = int(self.manifest.get("mta_sequences_per_example", self.per))
        self.key_layers: list = []  # the run's key layers (set by check)
        self._shards: dict[tuple[str, int], tuple] = {}

    @property
    def num_teacher_layers(self) -> int:
        return int(self.manifest["teacher"]["num_hidden_layers"])

    def widths(self, teacher_layers: list[int]) -> list[int]:
        """The widths of the cached ``hidden_states[l]`` for each l (to size MTA's projectors without the teacher)."""
        return [int(self.manifest["layers"]["widths"][str(l)]) for l in teacher_layers]

    # ----------------------------------------------------------------------------------- checks
    def check(self, cfg: RunConfig, tokenizer, key_layers, *, teacher=None, vocab_rows: int | None = None) -> None:
        """Stop with a :class:`CacheMismatch` naming every difference between the cache and this run."""
        m = self.manifest
        problems = []

        def differ(name, cached, run):
            if cached != run:
                problems.append(f"{name}: cache {json.dumps(cached, default=str)}, run {json.dumps(run, default=str)}")

        src = teacher_source(cfg)
        for k, v in src.items():
            differ(f"teacher.{k}", m["teacher"]["source"].get(k), v)
        changed = _fingerprint_changes(m["teacher"]["on_disk"], teacher_files_fingerprint(cfg))
        if changed:
            problems.append(f"the teacher on disk is not the one the cache was built from ({'; '.join(changed)})")
        if teacher is not None:
            differ("teacher weights (sha256)", m["teacher"]["weights_sha256"], weights_fingerprint(teacher))
        covered = int(m["teacher"].get("vocab", m["teacher"]["vocab_rows"]))  # ids the cached log-probs cover
        if vocab_rows is not None and self.top_k and vocab_rows < covered:  # (a full-vocabulary cache is cut to it)
            problems.append(f"the student's LM head has {vocab_rows} output rows, fewer than the {covered} token ids "
                            "of the cached top-k (its ids could fall outside the student's rows)")
        differ("tokenizer (sha256)", m["tokenizer"]["sha256"], tokenizer_fingerprint(tokenizer))
        data = data_fingerprint(cfg)
        for k, v in data.items():
            differ(f"data.{k}", m["data"].get(k), v)
        needed = sorted({k.teacher for k in key_layers})
        missing = [t for t in needed if t not in self.teacher_layers]
        if missing:
            problems.append(
                f"layer map: the run's key layers {[f'{k.student}->{k.teacher}' for k in key_layers]} need teacher "
                f"layers {missing}, the cache holds {self.teacher_layers} (cached map "
                f"{[str(k['student']) + '->' + str(k['teacher']) for k in m['layers']['key_layers']]})")
        mta = cfg.objective.mta
        if key_layers and mta.weights in ("teacher", "student_pooling"):
            for k, v in _importance_switches(mta).items():
                differ(f"objective.mta.{k} (importance weights)", m["importance"].get(k), v)
        if self.top_k and cfg.objective.temperature != 1.0:
            problems.append(
                f"objective.temperature {cfg.objective.temperature}: a top-{self.top_k} cache gives the teacher's tail "
                "mass at temperature 1 only; use temperature 1, or a cache built with --top-k 0")
        if problems:
            raise CacheMismatch(f"teacher cache {self.dir} does not match this run: " + "; ".join(problems)
                                + " (rebuild it with `mtakd cache-teacher` for this config)")
        self.key_layers = list(key_layers)

    def check_examples(self, split: str, dataset) -> None:
        """Stop with a :class:`CacheMismatch` unless the cache's ``split`` entries are the dataset's sequences: one
        entry per sequence (a DistiLLM-2 pair's two), each with the cached number of tokens and response positions."""
        if dataset is None or not len(dataset):
            return
        per = self.per
        seqs = _entries(dataset)
        if len(seqs) != per * len(dataset):
            raise CacheMismatch(
                f"teacher cache {self.dir} holds {per} sequence(s) per example, this run's {split} examples hold "
                f"{len(seqs) // len(dataset)} (DistiLLM-2's pairs hold 2); build the cache with this run's config")
        cached = int(self.manifest["examples"].get(split, 0)) // per
        if len(dataset) != cached:
            raise CacheMismatch(f"teacher cache {self.dir} holds {cached} {split} examples, the run has {len(dataset)}")
        lengths, n_resp = self._lengths(split)
        run_len = torch.tensor([len(x.input_ids) for x in seqs])
        run_resp = torch.tensor([int(np.count_nonzero(np.asarray(x.labels[1:]) != -100)) for x in seqs])
        bad = ((lengths != run_len) | (n_resp != run_resp)).nonzero().flatten()
        if bad.numel():
            i = int(bad[0])
            raise CacheMismatch(
                f"teacher cache {self.dir}: {self._entry_name(split, i)} has {int(lengths[i])} tokens "
                f"({int(n_resp[i])} response positions) in the cache but {int(run_len[i])} ({int(run_resp[i])}) in "
                f"this run, and {bad.numel() - 1} more sequence(s) differ; the cache was built from other data or "
                "another tokenisation")

    def _entry_name(self, split: str, i: int) -> str:
        """Entry ``i`` as the run's data calls it: an example, or one sequence of an example of several (a
        DistiLLM-2 pair: entries 2i and 2i + 1 are its teacher- and student-response sequences)."""
        per = self.per
        if per == 1:
            return f"{split} example {i}"
        which = ("teacher-response", "student-response")[i % per] if per == 2 else f"#{i % per + 1}"
        return f"the {which} sequence of {split} example {i // per}"

    def _lengths(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, response positions) of every cached ``split`` entry, from the shards' offsets."""
        n = {split: int(self.manifest["examples"].get(split, 0))}
        offsets = [self._shard(split, j)[1:3] for _, j, _, _ in _shards(n, int(self.manifest["shard_size"]))]
        return tuple(torch.cat([o[i].diff() for o in offsets]) for i in (0, 1))

    # ---------------------------------------------------------------------------------- reading
    def _shard(self, split: str, j: int):
        key = (split, j)
        if key not in self._shards:
            from safetensors import safe_open

            path = self.dir / f"{split}-{j:05d}.safetensors"
            fh = safe_open(str(path), framework="pt")
            lengths, n_resp = fh.get_tensor("lengths"), fh.get_tensor("n_response")
            size = int(self.manifest["shard_size"])
            stored = lengths * _has_states(torch.arange(j * size, j * size + len(lengths)), self.per, self.mta_per)
            zero = torch.zeros(1, dtype=torch.long)
            self._shards[key] = (fh, *(torch.cat([zero, x.cumsum(0)]) for x in (lengths, n_resp, stored)))
        return self._shards[key]

    def _entry(self, split: str, index: int, layers: list[int]) -> dict:
        size = int(self.manifest["shard_size"])
        if not 0 <= index < int(self.manifest["examples"].get(split, 0)):
            raise CacheMismatch(f"teacher cache {self.dir} has no {split} example {index}")
        fh, tok_off, resp_off, state_off = self._shard(split, index // size)
        i = index % size
        a, b = int(tok_off[i]), int(tok_off[i + 1])
        c, d = int(resp_off[i]), int(resp_off[i + 1])
        out = {"length": b - a, "n_response": d - c, "logp": fh.get_slice("logp")[c:d]}
        if self.top_k:
            out["ids"], out["rest"] = fh.get_slice("ids")[c:d], fh.get_slice("rest")[c:d]
        e, f = int(state_off[i]), int(state_off[i + 1])
        for l in layers:
            for name in (f"hidden.{l}", f"importance.{l}"):
                x = fh.get_slice(name)[e:f]
                # an entry MTA does not align (f == e) reads as zeros: its rows are cut before the MTA loss
                out[name] = x if f > e else x.new_zeros((b - a, *x.shape[1:]))
        return out

    def fetch(self, split: str, indices: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        """The teacher's outputs for a batch, from the cache: ``logits`` is a
        :class:`~mtakd.objectives.base.CachedLogProbs` over the batch's response positions (in the order
        ``response_positions`` selects them), ``hidden_states`` a tuple indexed by block number holding the cached
        layers (``[B, T, d]``, zero at padding) and None elsewhere, and ``importance`` the cached w_t ``[L, B, T]``
        of the run's key layers (in key-layer order). Rows are checked against the batch's lengths."""
        from .objectives.base import CachedLogProbs

        device = attention_mask.device
        b, t = attention_mask.shape
        layers = sorted({k.teacher for k in self.key_layers})
        entries = [self._entry(split, int(i), layers) for i in indices.tolist()]
        lengths = attention_mask.sum(-1).tolist()
        n_resp = labels[:, 1:].ne(-100).sum(-1).tolist()
        for row, (e, n, r, i) in enumerate(zip(entries, lengths, n_resp, indices.tolist())):
            if e["length"] != n or e["n_response"] != r:
                raise CacheMismatch(
                    f"teacher cache {self.dir}: {self._entry_name(split, i)} has {e['length']} tokens "
                    f"({e['n_response']} response positions) in the cache but {n} ({r}) in this batch; the cache was "
                    "built from other data or another tokenisation")

        def padded(name, dtype=None):
            x = torch.nn.utils.rnn.pad_sequence([e[name] for e in entries], batch_first=True)
            x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, t - x.shape[1]))
            return x.to(device=device, dtype=dtype or x.dtype)

        hidden = [None] * (self.num_teacher_layers + 1)
        weights = {}
        for l in layers:
            hidden[l] = padded(f"hidden.{l}")
            weights[l] = padded(f"importance.{l}")
        logp = torch.cat([e["logp"] for e in entries]).to(device)
        ids = rest = None
        if self.top_k:
            ids = torch.cat([e["ids"] for e in entries]).to(device=device, dtype=torch.long)
            rest = torch.cat([e["rest"] for e in entries]).to(device)
        importance = torch.stack([weights[k.teacher] for k in self.key_layers]) if self.key_layers else None
        return SimpleNamespace(logits=CachedLogProbs(logp, ids, rest), hidden_states=tuple(hidden),
                               importance=importance)


# ---------------------------------------------------------------------------------------- writing
def build_cache(cfg: RunConfig, out: str | os.PathLike, *, top_k: int = 64, dtype: str = "bfloat16",
                batch_size: int | None = None, shard_size: int = 128, overwrite: bool = False,
                progress: bool = True) -> Path:
    """Run the teacher once over the run's training (and validation) examples and write the cache to ``out``.

    Resumable: a directory holding an unfinished cache for the same run and settings keeps its finished shards.
    Returns ``out``."""
    import shutil

    from tqdm.auto import tqdm
    from transformers import set_seed

    from . import __version__
    from .data import Collator
    from .run import build_datasets, resolve
    from .models import load_model, load_tokenizer, shared_vocabulary
    from .mta import MTALoss, resolve_key_layers
    from .mta.layers import hidden_widths
    from .objectives import build_objective
    from .objectives.base import _upcast

    if top_k < 0:
        raise ConfigError(f"--top-k must be >= 0 (0: the full vocabulary), got {top_k}")
    if dtype not in _DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    objective = build_objective(cfg.objective)
    use = objective.teacher_cache_use()
    if use == "none":
        raise ConfigError(f"objective.base {cfg.objective.base!r} cannot be trained from a teacher cache "
                          f"({objective.teacher_cache_reason()}); see docs/objectives.md")
    out = Path(out)
    t0 = time.perf_counter()
    set_seed(cfg.training.seed)  # a random_init teacher is the one `mtakd distill` builds
    tok = load_tokenizer(cfg.teacher)
    teacher = load_model(cfg.teacher).eval().requires_grad_(False)
    n_t = teacher.config.num_hidden_layers
    n_s = resolve(cfg, teacher.config)["student_layers"]
    keys = resolve_key_layers(cfg.objective.mta, n_s, n_t) if cfg.objective.mta_enabled else []
    mta = MTALoss(cfg.objective.mta, keys) if keys else None
    layers = sorted({k.teacher for k in keys})
    vocab_rows = teacher.get_output_embeddings().weight.shape[0]
    vocab = shared_vocabulary(tok, tok, teacher)  # the tokenizer's ids: padded output rows are not cached
    k = min(top_k, vocab)
    identity = {
        "format": FORMAT,
        "teacher": {"source": teacher_source(cfg), "on_disk": teacher_files_fingerprint(cfg),
                    "weights_sha256": weights_fingerprint(teacher),
                    "num_hidden_layers": n_t, "vocab_rows": vocab_rows, "vocab": vocab},
        "tokenizer": {"sha256": tokenizer_fingerprint(tok), "vocab_size": len(tok)},
        "data": data_fingerprint(cfg),
        "layers": {"key_layers": [vars(x) for x in keys], "teacher_layers": layers, "widths": {}},
        "importance": _importance_switches(cfg.objective.mta) if cfg.objective.mta is not None else {},
        "top_k": k, "dtype": dtype, "logprob_dtype": "float32" if k else dtype, "shard_size": shard_size,
    }
    per = objective.sequences_per_example
    mta_per = min(per, objective.mta_sequences or per)
    if per > 1:  # (absent otherwise: the manifests of one-sequence caches are unchanged)
        identity["sequences_per_example"] = per
    if mta_per < per:  # (absent: every entry holds MTA's states)
        identity["mta_sequences_per_example"] = mta_per
    manifest_path = out / MANIFEST
    state = _process_state()
    # every process checks the directory (read only: all see the same files and decide alike), then the main one
    # clears it (--overwrite) and writes the initial manifest while the others wait
    if out.exists() and any(out.iterdir()):
        old = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
        if overwrite and old is not None:
            state.wait_for_everyone()
            if state.is_main_process:
                shutil.rmtree(out)
        elif old is None:
            raise FileExistsError(f"--out {out} is not empty and holds no teacher cache; choose another directory")
        elif old.get("complete") and _same_build(old, identity):
            log.info("%s already holds this cache", out)
            return out
        elif not _same_build(old, identity):
            raise FileExistsError(f"--out {out} holds a teacher cache built with other settings; pass --overwrite "
                                  "to replace it, or choose another directory")
    state.wait_for_everyone()

    # the run's token sequences (spans are not needed: they come from the data at training time)
    token_cfg = cfg.model_copy(deep=True)
    if token_cfg.objective.mta is not None:
        token_cfg.objective.mta.enabled = False
    train, val, _ = build_datasets(token_cfg, tok, progress=progress and state.is_main_process, objective=objective)
    # one entry per sequence: a DistiLLM-2 pair i is entries 2i (teacher response) and 2i + 1 (student response)
    splits = {s: None if d is None else _entries(d) for s, d in (("train", train), ("validation", val))}
    identity["examples"] = {s: (0 if d is None else len(d)) for s, d in splits.items()}
    manifest = {**identity, "mtakd_version": __version__, "complete": False}
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(manifest_path, manifest)
    state.wait_for_everyone()

    device = state.device
    if getattr(teacher, "hf_device_map", None):  # teacher.device_map: left where transformers placed it
        if len({str(d) for d in teacher.hf_device_map.values()}) > 1 or state.num_processes > 1:
            raise ConfigError("cache-teacher does not support a teacher spread over several devices "
                              "(teacher.device_map) or device-mapped teachers in several processes; build the cache "
                              "with a teacher that fits one device per process (docs/scaling.md, \"Large teachers\")")
        device = next(teacher.parameters()).device
    else:
        teacher.to(device)
    collate = Collator(tok.pad_token_id)
    bs = batch_size or cfg.training.per_device_eval_batch_size
    store = _DTYPES[dtype]
    # data parallel: shard j (numbered over both splits) is computed and written by process j mod num_processes;
    # a shard's batches do not depend on who computes it, so the files are those of a single-process build
    mine = [(split, j, lo, hi) for n_, (split, j, lo, hi) in enumerate(_shards(identity["examples"], shard_size))
            if n_ % state.num_processes == state.process_index]
    with tqdm(total=sum(hi - lo for *_, lo, hi in mine), desc="caching teacher", unit="example",
              disable=not (progress and state.is_main_process)) as bar:
        for split, j, lo, hi in mine:
            data = splits[split]
            path = out / f"{split}-{j:05d}.safetensors"
            if path.is_file():  # finished by an earlier (interrupted) build
                bar.update(hi - lo)
                continue
            parts: dict[str, list] = {}
            for a in range(lo, hi, bs):
                batch = collate([data[i] for i in range(a, min(hi, a + bs))])
                keep = _has_states(torch.arange(a, min(hi, a + bs)), per, mta_per)
                for name, x in _teacher_entries(teacher, batch, layers, mta, k, store, device, _upcast,
                                                vocab, keep).items():
                    parts.setdefault(name, []).append(x)
                bar.update(min(hi, a + bs) - a)
            _save_atomic({name: torch.cat(x).contiguous() for name, x in parts.items()}, path)
    state.wait_for_everyone()  # every shard is written: the main process completes the manifest
    total = sum(identity["examples"].values())
    if not state.is_main_process:
        state.wait_for_everyone()
        return out
    missing = [f"{split}-{j:05d}" for split, j, _, _ in _shards(identity["examples"], shard_size)
               if not (out / f"{split}-{j:05d}.safetensors").is_file()]
    if missing:
        raise RuntimeError(f"teacher cache {out}: shards {missing} were not written")
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    manifest["layers"]["widths"] = {str(l): w for l, w in zip(layers, hidden_widths(teacher, layers))}
    manifest.update(complete=True, size_bytes=size, bytes_per_example=round(size / max(total, 1)),
                    build_seconds=round(time.perf_counter() - t0, 1))
    _write_json(manifest_path, manifest)
    log.info("teacher cache: %d examples, %.1f MB (%.0f kB per example) in %s", total, size / 1e6,
             size / max(total, 1) / 1e3, out)
    state.wait_for_everyone()
    return out


def _shards(examples: dict[str, int], shard_size: int) -> list[tuple[str, int, int, int]]:
    """(split, shard number, first example, end) of every shard of the cache, in writing order."""
    return [(split, j, j * shard_size, min(n, (j + 1) * shard_size))
            for split, n in examples.items() for j in range(-(-n // shard_size))]


def _process_state():
    """accelerate's process state: one process, or those `accelerate launch` / torchrun started (over gloo on a
    machine without GPUs, as `mtakd distill` does), each on its own device."""
    from accelerate import PartialState

    from .run import _cpu_processes

    _cpu_processes()
    return PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"))


def _same_build(old: dict, new: dict) -> bool:
    keys = ("format", "teacher", "tokenizer", "data", "importance", "top_k", "dtype", "shard_size",
            "sequences_per_example", "mta_sequences_per_example")
    return all(old.get(k) == new.get(k) for k in keys) and (
        old["layers"]["key_layers"] == new["layers"]["key_layers"])


@torch.no_grad()
def _teacher_entries(teacher, batch, layers, mta, k, store, device, upcast, vocab=None,
                     keep=None) -> dict[str, torch.Tensor]:
    """One batch's cache tensors, concatenated over its examples: per token (``hidden.{l}``, ``importance.{l}``, of
    the rows ``keep`` selects, all by default),
    per response position (``logp``, and for a top-k cache ``ids`` and ``rest``, the teacher's leftover log-mass
    from its full float32 log-softmax: :meth:`CachedLogProbs.top_k`) and per example (``lengths``,
    ``n_response``). The log-probabilities are over the first ``vocab`` rows, the tokenizer's ids (padded output
    rows left out, as in training)."""
    from .objectives.base import CachedLogProbs

    ids, mask, labels = (batch[k_].to(device) for k_ in ("input_ids", "attention_mask", "labels"))
    out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=bool(layers), use_cache=False)
    real = mask.bool()
    resp = labels[:, 1:].ne(-100)
    logp = F.log_softmax(upcast(out.logits[:, :-1][resp][:, :vocab]), -1)
    entries = {"lengths": real.sum(-1).cpu(), "n_response": resp.sum(-1).cpu()}
    if k:
        top = CachedLogProbs.top_k(logp, k)
        entries.update(logp=top.logp.float().cpu(), ids=top.ids.to(torch.int32).cpu(), rest=top.rest.float().cpu())
    else:
        entries["logp"] = logp.to(store).cpu()
    stored = real if keep is None else real & keep.to(device)[:, None]
    for l in layers:
        h = out.hidden_states[l]
        w = mta.teacher_importance(upcast(h), mask)  # [B, T], the MTA loss's own path (switches honoured)
        entries[f"hidden.{l}"] = h[stored].to(store).cpu()
        entries[f"importance.{l}"] = w[stored].float().cpu()
    return entries


def _save_atomic(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------- CLI
def _cmd_cache_teacher(args) -> int:
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    out = build_cache(cfg, args.out, top_k=args.top_k, dtype=args.dtype, batch_size=args.batch_size,
                      shard_size=args.shard_size, overwrite=args.overwrite)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # `accelerate launch`: one line, from the main process
        main_process = dist.get_rank() == 0
        dist.destroy_process_group()
        if not main_process:
            return 0
    print(f"teacher cache written to {out}; train with `mtakd distill --config {args.config} teacher.cache={out}`")
    return 0


def add_parser(sub) -> None:
    p = add_config_command(
        sub, "cache-teacher", help="run the teacher once over a run's data and cache its signals (offline distillation)",
        description="Cache what the trainer needs from the teacher (top-k log-probabilities at the response\n"
        "positions, MTA's key-layer hidden states and importance weights) for the training and validation examples of a\n"
        "run config; `mtakd distill ... teacher.cache=DIR` then trains without running the teacher.\n"
        "Interrupted builds resume (finished shards are kept). Data parallel under `accelerate launch` / torchrun:\n"
        "each process computes and writes its share of the shards. See docs/teacher_cache.md.",
        config_help="the run config the cache is for",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="cache directory")
    p.add_argument("--top-k", type=int, default=64,
                   help="teacher log-probabilities kept per response position (default 64; 0 = the full vocabulary)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16",
                   help="storage dtype of the hidden states (and of full-vocabulary log-probabilities); "
                   "default bfloat16")
    p.add_argument("--batch-size", type=int, default=None,
                   help="teacher batch size (default training.per_device_eval_batch_size)")
    p.add_argument("--shard-size", type=int, default=128, help="examples per safetensors shard (default 128)")
    p.add_argument("--overwrite", action="store_true", help="replace a cache built with other settings in --out")
    p.set_defaults(func=_cmd_cache_teacher)
