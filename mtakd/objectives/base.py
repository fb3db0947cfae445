"""Shared machinery of the base objectives: the registry and the token-level KD template.

Every base objective is a small module registering one :class:`Objective` subclass under a name.
Token-level divergences only implement :meth:`TokenDivergence.divergence` — the per-position
divergence between the student's and the teacher's next-token distributions; masking to response
tokens, temperature, the token mean and the mix with cross-entropy
(``L_base = (1 - kd_ratio)·CE + kd_ratio·KD``, DSKD's convention) live here, once.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..models import apply_head, head_parameters  # noqa: F401  (apply_head: re-exported)
from .rows import CachedLogProbs, HiddenHead, log_rest, response_positions, shared_rows  # noqa: F401  (re-exported)

# `ObjectiveConfig` in annotations is mtakd.config's; not imported, not even for type checking: the
# config validates against this module, which must not depend on it (tests/test_imports.py)

OBJECTIVES: dict[str, type["Objective"]] = {}


def register(name: str):
    def deco(cls):
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} registered twice")
        cls.name = name
        OBJECTIVES[name] = cls
        return cls

    return deco


def build_objective(cfg: "ObjectiveConfig") -> "Objective":
    return OBJECTIVES[cfg.base](cfg)


class Objective:
    """A base distillation objective. ``__call__`` returns named scalar losses; ``"loss"`` is optimised.

    Class attributes tell the trainer what the objective needs, so nothing else is computed:
    ``needs_teacher`` (teacher forward pass), ``needs_hidden_states`` (all layers' hidden states),
    ``needs_models`` (``__call__`` also gets the ``student=`` and ``teacher=`` modules, e.g. for their LM heads).

    Optional hooks, all no-ops here, for objectives that do more than score one batch (DistiLLM's
    student-generated outputs, DistiLLM-2's response pairs): :meth:`setup` (once, with the run config,
    tokenizer and models), :meth:`build_examples` / :meth:`collator` (dataset and batches),
    :meth:`prepare_inputs` (top of every ``compute_loss``), :meth:`callbacks` (TrainerCallbacks) and
    :meth:`save_state` / :meth:`load_state` (the objective's state inside every checkpoint).
    ``Options``: a pydantic model validating ``objective.options`` (None: the base takes no options).
    """

    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = True
    needs_hidden_states: ClassVar[bool] = False
    needs_models: ClassVar[bool] = False
    # works when teacher and student tokenise differently (objective.cross_tokenizer): reads no teacher logits
    # indexed by the student's vocabulary or positions (e.g. ``uld``, ``sft``); False: refused in such a run
    cross_tokenizer: ClassVar[bool] = False
    # __call__ takes a HiddenHead in place of either model's logits: with objective.chunk_size > 0 the trainer then
    # runs the models with logits_to_keep=1 and the LM heads are fused into the chunked loss (docs/scaling.md)
    accepts_hidden_head: ClassVar[bool] = False
    # token sequences per dataset item, collated as consecutive blocks of rows (DistiLLM-2's pairs: 2); a teacher
    # cache stores item i's as entries n·i … n·i + n − 1 (docs/teacher_cache.md)
    sequences_per_example: ClassVar[int] = 1
    # how many of them (the first) MTA aligns (the collator's ``mta_rows``); None: all. A teacher cache stores MTA's
    # key-layer states for those only
    mta_sequences: ClassVar[int | None] = None
    Options: ClassVar[type | None] = None

    def __init__(self, cfg: "ObjectiveConfig"):
        self.cfg = cfg
        self.opts = self.Options.model_validate(cfg.options) if self.Options is not None else None
        self.vocab: int | None = None  # the tokenizer's ids (set_vocabulary); None: every row both heads share

    def set_vocabulary(self, n: int | None) -> None:
        """Compare the two models' distributions on the first ``n`` rows, the tokenizer's ids
        (:func:`mtakd.models.vocabulary_ids`): padded output rows (e.g. Qwen2.5-7B's 152,064 against 1.5B's 151,936
        for 151,665 ids) are ignored. ``distill`` sets it before :meth:`setup`; the CE keeps the student's rows."""
        self.vocab = n

    def __call__(self, student_out, teacher_out, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # ------------------------------------------------------------------------------ optional hooks
    def setup(self, run_cfg, tokenizer, student, teacher) -> None:
        """Called once by ``distill()`` after the models are built (layer counts, tokenizer, data settings)."""

    def build_examples(self, records, tokenizer, data_cfg, *, spans, stats, progress):
        """Tokenised examples of one data split (default: :func:`mtakd.data.build_examples`); ``spans``: the
        :class:`mtakd.data.SpanSettings` of MTA's units, or None."""
        from ..data import build_examples

        return build_examples(records, tokenizer, data_cfg, spans=spans, stats=stats, progress=progress)

    def collator(self, pad_token_id: int):
        from ..data import Collator

        return Collator(pad_token_id)

    def prepare_inputs(self, trainer, model, inputs: dict) -> dict:
        """Called at the top of ``compute_loss``; may replace the batch (e.g. by student-generated outputs)."""
        return inputs

    def callbacks(self) -> list:
        """TrainerCallbacks the trainer registers (e.g. reacting to evaluations)."""
        return []

    def teacher_cache_use(self) -> str:
        """How the base works with a teacher cache (``teacher.cache``, docs/teacher_cache.md): ``"full"`` (every
        teacher signal is read from the cache; the teacher is not loaded), ``"partial"`` (dataset batches read the
        cache, batches made during training run the loaded teacher) or ``"none"`` (refused, with
        :meth:`teacher_cache_reason`). Default ``"none"``: a base must declare what it reads from the teacher."""
        return "none"

    def teacher_cache_reason(self) -> str:
        """Why :meth:`teacher_cache_use` is ``"none"``: shown in the error."""
        return "it reads more of the teacher than the cache holds (next-token log-probabilities, MTA's key layers)"

    def save_state(self, directory: str, rank: int = 0) -> None:
        """Write the objective's training state (if any) into a checkpoint being saved, one file per process."""

    def load_state(self, directory: str, rank: int = 0) -> bool:
        """Restore what :meth:`save_state` wrote, when resuming from the checkpoint ``directory``."""
        return False


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precision → float32 for the losses; float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over response tokens (labels −100 elsewhere); 0 if there are none.
    Only response positions are gathered, so prompt and padding rows cost no [T, V] log-softmax."""
    mask, targets = response_positions(labels)
    if not mask.any():
        return logits.sum() * 0.0
    return F.cross_entropy(_upcast(logits[:, :-1][mask]), targets[mask])


def topk_buckets(s_logp: torch.Tensor, t_logp_k: torch.Tensor, ids: torch.Tensor,
                 t_rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) log-probabilities ``[N, k+1]`` over the teacher's top-k tokens plus one bucket holding the
    rest of the vocabulary: the student's full distribution ``s_logp [N, V]`` is gathered at ``ids`` and its
    remaining mass, :func:`log_rest`, becomes the last bucket; the teacher's bucket is its cached leftover log-mass
    ``t_rest [N]`` (docs/objectives.md). Both are distributions on k+1 outcomes, so every divergence applies
    unchanged. A bucket's log-mass is floored at ``log`` of the smallest normal float (an empty bucket, k = V,
    gives finite log-probabilities, not ``0·log 0``)."""
    floor = math.log(torch.finfo(s_logp.dtype).tiny)
    s_rest = log_rest(s_logp, ids).clamp_min(floor)
    t_rest = _upcast(t_rest).unsqueeze(-1).clamp_min(floor)
    return torch.cat([s_logp.gather(-1, ids), s_rest], -1), torch.cat([_upcast(t_logp_k), t_rest], -1)


def compared_logp(z: torch.Tensor, t, temperature: float = 1.0,
                  vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) log-probabilities on the outcomes a divergence compares, from the student's (upcast) logit
    rows ``z [N, V]`` and the teacher's: logit rows, or a teacher cache's :class:`CachedLogProbs` — top-k
    (temperature 1, checked when the cache is opened): the ``[N, k+1]`` buckets of :func:`topk_buckets`; full
    vocabulary (``ids`` None): log-probabilities are logits up to a constant. Padded embedding rows (e.g. Qwen's) are
    cut off: both sides are compared on :func:`shared_rows`."""
    s = z if temperature == 1 else z / temperature  # τ = 1: no division, which would copy each [N, V] side
    if isinstance(t, CachedLogProbs) and t.ids is not None:  # the cache's ids are the tokenizer's (< vocab)
        s = s[:, :shared_rows(s.shape[-1], vocab=vocab)]
        return topk_buckets(F.log_softmax(s, -1), t.logp, t.ids, t.rest)
    t = _upcast(t.logp if isinstance(t, CachedLogProbs) else t)
    t = t if temperature == 1 else t / temperature
    v = shared_rows(s.shape[-1], t.shape[-1], vocab=vocab)
    return F.log_softmax(s[:, :v], -1), F.log_softmax(t[:, :v], -1)


class _Rows:
    """One side's response rows, read chunk by chunk: a ``[B, T, ·]`` tensor (logits, or a :class:`HiddenHead`'s
    hidden state, mapped through its head) at the flat positions ``index``, or a :class:`CachedLogProbs` whose
    rows already are the response positions, in order."""

    def __init__(self, src, index: torch.Tensor):
        self.cached = src if isinstance(src, CachedLogProbs) else None
        self.head = src.head if isinstance(src, HiddenHead) else None
        x = src.hidden if isinstance(src, HiddenHead) else src
        self.flat = None if self.cached is not None else x.flatten(0, 1)
        self.index = index

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """The source rows ``lo:hi`` (hidden states or logits), outside any graph."""
        return self.flat.detach().index_select(0, self.index[lo:hi])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.head is None else apply_head(self.head, x)

    def chunk(self, lo: int, hi: int):
        """The teacher's logits of rows ``lo:hi``, or the cache's :class:`CachedLogProbs` of those rows."""
        if self.cached is not None:
            return self.cached.rows(lo, hi)
        return self.logits(self.rows(lo, hi))


class _FusedChunks(torch.autograd.Function):
    """``Σ_chunks`` of a row loss with its gradients computed chunk by chunk *in the forward pass*, the way fused
    linear-cross-entropy kernels do: per chunk the student's logits are built, the loss and its gradients with
    respect to the chunk's input rows and the LM head's parameters are taken at once, and the chunk's ``[C, V]``
    tensors are freed. The backward pass only scales the stored gradients: nothing is recomputed, and only the
    gradient buffers (the size of the student's input and of the head) outlive a chunk."""

    @staticmethod
    def forward(ctx, chunks, s_rows, flat, *params):
        grad_flat = torch.zeros_like(flat) if flat.requires_grad else None
        grad_params = [None] * len(params)
        totals = None
        with torch.enable_grad():
            for lo, hi, score in chunks:
                x = s_rows.rows(lo, hi).requires_grad_(flat.requires_grad)
                loss, *logged = score(s_rows.logits(x), lo, hi)
                wrt = ([x] if flat.requires_grad else []) + list(params)
                grads = list(torch.autograd.grad(loss, wrt, allow_unused=True)) if loss.requires_grad else [None] * len(wrt)
                if flat.requires_grad:
                    g = grads.pop(0)
                    if g is not None:
                        grad_flat.index_add_(0, s_rows.index[lo:hi], g.to(grad_flat.dtype))
                for i, g in enumerate(grads):
                    if g is not None:
                        grad_params[i] = g if grad_params[i] is None else grad_params[i].add_(g)
                values = [loss.detach()] + [v.detach() for v in logged]
                totals = values if totals is None else [a + b for a, b in zip(totals, values)]
        ctx.grads = (grad_flat, grad_params)
        ctx.mark_non_differentiable(*totals[1:])
        return tuple(totals)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grad_flat, grad_params = ctx.grads
        ctx.grads = None

        def scale(g):  # the buffers are ours: scaled in place
            return None if g is None else g.mul_(grad_loss.to(g.dtype))

        return (None, None, scale(grad_flat), *[scale(g) for g in grad_params])


def chunked_row_loss(student, teacher, mask: torch.Tensor, score, chunk_size: int, n_logged: int = 0):
    """``(Σ of score's loss, Σ of each of its n_logged logged values)`` over the response rows (positions ``t`` with
    ``mask[b, t]``, which predict token ``t + 1``), ``chunk_size`` rows at a time (0: all at once).

    ``student``: the student's ``[B, T, V]`` logits or a :class:`HiddenHead`; ``teacher``: the teacher's logits, a
    :class:`HiddenHead`, a :class:`CachedLogProbs` or None (teacher logits are computed and read under ``no_grad``).
    ``score(s_logits [C, V], t_chunk, lo, hi) -> (loss_sum, *logged_sums)`` scores rows ``lo:hi``; ``s_logits`` is
    the student's logits of those rows (not yet upcast), ``t_chunk`` the teacher's (a cache's
    :class:`CachedLogProbs` of those rows; None without a teacher). Gradients equal those of the unchunked computation (:class:`_FusedChunks`); a student
    :class:`HiddenHead` gets gradients in its hidden state and its head's parameters, and its full logits are
    never built."""
    b, t1 = mask.shape
    width = (student.hidden if isinstance(student, HiddenHead) else student).shape[1]
    index = (torch.arange(b, device=mask.device)[:, None] * width + torch.arange(t1, device=mask.device))[mask]
    n = index.numel()
    s_rows = _Rows(student, index)
    t_rows = None if teacher is None else _Rows(teacher, index)

    def with_teacher(s_logits, lo, hi):
        tc = None
        if t_rows is not None:
            with torch.no_grad():
                tc = t_rows.chunk(lo, hi)
        return score(s_logits, tc, lo, hi)

    size = chunk_size if chunk_size > 0 else max(n, 1)
    chunks = [(lo, min(lo + size, n), with_teacher) for lo in range(0, n, size)]
    flat = s_rows.flat
    params = [] if s_rows.head is None else [p for p in head_parameters(s_rows.head) if p.requires_grad]
    if not chunks:
        zero = flat.sum() * 0.0
        return (zero, *[zero.detach()] * n_logged)
    if torch.is_grad_enabled() and (flat.requires_grad or params):
        return _FusedChunks.apply(chunks, s_rows, flat, *params)
    totals = None
    with torch.no_grad():
        for lo, hi, fn in chunks:
            values = [v.detach() for v in fn(s_rows.logits(s_rows.rows(lo, hi)), lo, hi)]
            totals = values if totals is None else [a + c for a, c in zip(totals, values)]
    return tuple(totals)


def chunked_cross_entropy(student, labels: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """:func:`cross_entropy` from logits or a :class:`HiddenHead`, ``chunk_size`` response positions at a time."""
    if not isinstance(student, HiddenHead) and chunk_size <= 0:
        return cross_entropy(student, labels)
    mask, targets = response_positions(labels)
    y = targets[mask]

    def score(z, _, lo, hi):
        return (F.cross_entropy(_upcast(z), y[lo:hi], reduction="sum"),)

    return chunked_row_loss(student, None, mask, score, chunk_size)[0] / max(int(y.numel()), 1)


class TokenDivergence(Objective):
    """Token-level KD: mean over response positions of ``divergence(student, teacher)``, mixed with CE.

    With a teacher cache (:class:`CachedLogProbs` in place of the teacher's logits), the full-vocabulary cache
    gives the same loss as the online teacher; a top-k cache compares the two distributions on the teacher's
    top-k tokens plus one bucket for the rest of the vocabulary (:func:`topk_buckets`).

    CE and KD are computed ``objective.chunk_size`` response positions at a time (:meth:`base_loss`), from either
    model's logits or its last hidden state and LM head (:class:`HiddenHead`)."""

    accepts_hidden_head = True

    def teacher_cache_use(self) -> str:
        return "full"

    def divergence(self, s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
        """Per-position divergence ``[N]`` from log-probabilities ``[N, V]`` (student, teacher), or ``[N, k+1]``:
        the top-k buckets of a teacher cache (:func:`topk_buckets`); any divergence of two distributions on the
        same outcomes works on both."""
        raise NotImplementedError

    def bucket_divergence(self, s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
        """:meth:`divergence` on a top-k cache's ``[N, k+1]`` outcomes (:func:`topk_buckets`; the last one is the
        bucket). The same formula by default; a divergence that ranks the outcomes (``akl``) overrides it."""
        return self.divergence(s_logp, t_logp)

    def _chunked(self, student, teacher) -> bool:
        return self.cfg.chunk_size > 0 or isinstance(student, HiddenHead) or isinstance(teacher, HiddenHead)

    def base_loss(self, student, teacher, labels: torch.Tensor, kd_ratio: float | None = None, with_ce: bool = True):
        """``(L_base, CE, KD)`` — ``L_base = (1 − kd_ratio)·CE + kd_ratio·KD``, CE and KD token means over the response
        positions — computed ``objective.chunk_size`` positions at a time (:func:`chunked_row_loss`): the student's
        CE and every divergence need only one chunk's ``[C, V]`` tensors at once, with the gradients of the unchunked
        computation. ``student``: logits or a :class:`HiddenHead` (the LM head fused into the loss); ``teacher``:
        logits, a :class:`HiddenHead` or a :class:`CachedLogProbs`. Chunk size 0 with logits on both sides: the
        unchunked computation (:func:`cross_entropy`, :meth:`kd_loss`). ``objective.fused_kernel`` liger / auto:
        Liger-Kernel computes the same three where it covers the base (:mod:`.fused`)."""
        r = self.cfg.kd_ratio if kd_ratio is None else kd_ratio
        if self.cfg.fused_kernel != "none":  # Liger-Kernel where it applies (objective.fused_kernel, .fused)
            from .fused import fused_base_loss

            fused = fused_base_loss(self, student, teacher, labels, r, with_ce)
            if fused is not None:
                return fused
        # a term of weight 0 (kd_ratio 1: DistiLLM's, DistiLLM-2's) is only logged: computed outside the graph
        logged_ce = (lambda z: z.detach()) if r == 1 else (lambda z: z)  # noqa: E731
        if not self._chunked(student, teacher):
            ce = cross_entropy(logged_ce(student), labels) if with_ce else student.sum() * 0.0
            kd = self.kd_loss(student, teacher, labels)
            return (1 - r) * ce + r * kd, ce, kd
        mask, targets = response_positions(labels)
        y = targets[mask]

        def score(z, tc, lo, hi):
            z = _upcast(z)
            kd = self._kd_rows(z, tc)
            ce = F.cross_entropy(logged_ce(z), y[lo:hi], reduction="sum") if with_ce else kd.detach() * 0.0
            return (1 - r) * ce + r * kd, ce, kd

        loss, ce, kd = chunked_row_loss(student, teacher, mask, score, self.cfg.chunk_size, n_logged=2)
        n = max(int(y.numel()), 1)
        return loss / n, ce / n, kd / n

    def kd_loss(self, s_logits, t_logits, labels: torch.Tensor) -> torch.Tensor:
        """Mean divergence over response positions; ``t_logits``: the teacher's ``[B, T, V]`` logits, or a
        :class:`CachedLogProbs` from a teacher cache. Chunked (``objective.chunk_size``, :meth:`base_loss`) unless
        the chunk size is 0 and both sides are logits."""
        if self._chunked(s_logits, t_logits):
            return self.base_loss(s_logits, t_logits, labels, kd_ratio=1.0, with_ce=False)[0]  # differentiable: = KD
        mask, _ = response_positions(labels)
        s = s_logits[:, :-1][mask]  # only response positions are gathered: [N, V] instead of [B, T, V]
        if s.shape[0] == 0:
            return s_logits.sum() * 0.0
        t = t_logits if isinstance(t_logits, CachedLogProbs) else t_logits[:, :-1][mask]
        return self._kd_rows(_upcast(s), t) / s.shape[0]

    def _kd_rows(self, z: torch.Tensor, tc) -> torch.Tensor:
        """Summed divergence of the student's logit rows ``z`` ``[N, V]`` from the teacher's: logit rows, or a
        :class:`CachedLogProbs` of a teacher cache (a top-k cache's (k+1)-bucket distributions, scored by
        :meth:`bucket_divergence`), compared as :func:`compared_logp` says."""
        topk = isinstance(tc, CachedLogProbs) and tc.ids is not None
        divergence = self.bucket_divergence if topk else self.divergence
        return divergence(*compared_logp(z, tc, self.cfg.temperature, self.vocab)).sum()

    def __call__(self, student_out, teacher_out, batch):
        loss, ce, kd = self.base_loss(student_out.logits, teacher_out.logits, batch["labels"])
        return {"loss": loss, "ce": ce.detach(), "kd": kd.detach()}
