"""Teacher-forced metrics of a causal LM on reference responses: negative log-likelihood (nats per token) and
KL(teacher ‖ student) over the vocabulary (the tokenizer's ids: padded output rows are left out), at the response
positions (labels ≠ −100).

One implementation for every caller: ``mtakd evaluate --metrics nll kl`` (:mod:`mtakd.evaluate`) and the
held-out response NLL that ``mtakd student`` reports (:func:`response_nll`). The KL is the forward KL of
the distillation objectives (MTA_SPEC §2, the logit-distillation base ``L_base``) measured instead of trained:
``Σ_v p_T(v) (log p_T(v) − log p_S(v))`` per position.

Batches are right-padded (``input_ids``, ``attention_mask``, ``labels`` with −100 on the prompt and the
padding), so positions count from each row's first token and a row's values do not depend on its batch.
Each model runs once per batch with ``logits_to_keep=1`` and its last hidden state is kept at the response
positions only; the LM head then builds the logits ``CHUNK`` positions at a time, as the training loss does
(``objective.chunk_size``), so memory holds ``[CHUNK, vocabulary]`` logits, not ``[batch, length, vocabulary]``.
A model whose logits are more than ``head(last hidden state)`` (soft-capping or logit scaling in its config, or a
head whose ``head(h)`` differs from the last logits the model returned: the runtime guard shared with training,
:func:`mtakd.models.head_reproduces`) returns logits from the first response position of the batch onwards
(``logits_to_keep``), which are then read in the same chunks.

Several models scored against one teacher in one process (``benchmarks/quality.py``) share a
:class:`TeacherReference`: the teacher runs once per distinct batch.
"""

from __future__ import annotations

import hashlib
import logging
import weakref

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
CHUNK = 1024  # response positions per log-softmax chunk


_HEAD_OK: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its head passed the runtime guard


def _response_rows(model, batch: dict, first: int, resp: torch.Tensor):
    """``(rows, head, plain)`` with ``head(rows[i:j])`` the logits at response positions ``i .. j`` (of the ``N``
    positions ``resp`` marks among ``first ..``). For a plain head (:func:`mtakd.models.plain_head`, confirmed at run
    time by :func:`mtakd.models.head_reproduces` on the last position's logits, which ``logits_to_keep=1`` returns
    anyway): ``rows`` is the last hidden state there, ``[N, d]``, ``head`` the LM head and ``plain`` True, so
    ``[N, V]`` logits are built one chunk at a time, as in training (:class:`mtakd.objectives.base.HiddenHead`);
    otherwise (a head the model post-processes, e.g. Granite's ``logits_scaling``) ``rows`` are the ``[N, V]``
    logits the model returns and ``plain`` False."""
    from .models import forward_last_hidden, head_reproduces, plain_head, unwrap

    ids = batch["input_ids"]
    device = next(model.parameters()).device
    kw = dict(input_ids=ids.to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False)
    resp = resp.to(device)
    if plain_head(model) and _HEAD_OK.get(model, True):
        out = forward_last_hidden(model, **kw)
        hidden = out.hidden_states[-1]
        if model not in _HEAD_OK:
            _HEAD_OK[model] = head_reproduces(model, hidden[:, -1], out.logits[:, -1])
            if not _HEAD_OK[model]:
                log.warning("the LM head of %s does not reproduce its logits from the last hidden state: the "
                            "teacher-forced metrics read its full logits instead", type(unwrap(model)).__name__)
        if _HEAD_OK[model]:
            return hidden[:, first - 1 : -1][resp], unwrap(model).get_output_embeddings(), True
    # logits at positions first−1 .. T−1; the last predicts nothing
    return model(**kw, logits_to_keep=ids.shape[1] - first + 1).logits[:, :-1][resp], lambda x: x, False


class TeacherReference:
    """The teacher of the KL, remembering its last hidden state at the response positions of each batch it has
    scored. A batch seen again (the same set scored for another model) costs only the LM head on those
    ``[N, d]`` states, not a forward pass. A model whose logits are more than ``head(last hidden state)``
    (soft-capping, logit scaling) is run every time."""

    def __init__(self, model, remember: bool = True):
        from .models import plain_head

        self.model = model
        self.remember = remember and plain_head(model)
        self._states: dict[str, torch.Tensor] = {}

    def response_rows(self, batch: dict, first: int, resp: torch.Tensor):
        """:func:`_response_rows` of the teacher."""
        if not self.remember:
            return _response_rows(self.model, batch, first, resp)[:2]
        key = hashlib.sha1(b"".join(batch[k].cpu().numpy().tobytes() for k in ("input_ids", "attention_mask", "labels"))
                           + str((tuple(batch["input_ids"].shape), first)).encode()).hexdigest()
        if key in self._states:
            return self._states[key]
        rows, head, plain = _response_rows(self.model, batch, first, resp)
        if plain:  # [N, d] states; a model whose head failed the guard gives [N, V] logits: not kept
            self._states[key] = rows, head
        return rows, head


def batch_stats(model, batch: dict, teacher=None, vocab: int | None = None) -> dict[str, torch.Tensor]:
    """Per row of a right-padded batch: ``nll`` (summed nats over its response tokens), ``tokens`` (their
    count) and, with ``teacher`` (a model or a :class:`TeacherReference`), ``kl`` (summed KL(teacher ‖ model)
    over the same positions). One forward pass per model, no gradients; logits ``CHUNK`` positions at a time.
    The KL compares the two distributions on the rows both heads have, cut to the tokenizer's ``vocab`` ids when
    given (:func:`mtakd.models.shared_vocabulary`): padded output rows are left out, as in training; the NLL is the
    model's own distribution over all its rows."""
    from .objectives.base import shared_rows

    labels = batch["labels"]
    resp = labels != -100
    if not resp.any():
        raise ValueError("teacher-forced metrics: the batch has no response tokens (every label is -100)")
    first = int(resp.any(0).nonzero()[0])
    first = max(first, 1)  # the first token of a sequence has no prediction
    labels, resp = labels[:, first:], resp[:, first:]
    rows = resp.nonzero()[:, 0]
    with torch.inference_mode():
        s_rows, s_head, _ = _response_rows(model, batch, first, resp)  # N response positions
        if teacher is not None and not isinstance(teacher, TeacherReference):
            teacher = TeacherReference(teacher, remember=False)
        t_rows, t_head = teacher.response_rows(batch, first, resp) if teacher is not None else (None, None)
        target = labels[resp].to(s_rows.device)
        nll, kl = torch.empty(len(target)), torch.empty(len(target))
        for i in range(0, len(target), CHUNK):
            logp = F.log_softmax(s_head(s_rows[i:i + CHUNK]).float(), -1)
            nll[i:i + CHUNK] = -logp.gather(-1, target[i:i + CHUNK, None])[:, 0].cpu()
            if t_rows is not None:
                t_logits = t_head(t_rows[i:i + CHUNK]).float().to(logp.device)
                v = shared_rows(t_logits.shape[-1], logp.shape[-1], vocab=vocab)
                logq = F.log_softmax(t_logits[:, :v], -1)
                logp_v = logp if v == logp.shape[-1] else F.log_softmax(logp[:, :v], -1)  # renormalised on v rows
                kl[i:i + CHUNK] = F.kl_div(logp_v, logq, log_target=True, reduction="none").sum(-1).cpu()
    n_rows = labels.shape[0]
    out = {"nll": torch.zeros(n_rows, dtype=torch.float64).index_add_(0, rows.cpu(), nll.double()),
           "tokens": resp.sum(1).cpu()}
    if teacher is not None:
        out["kl"] = torch.zeros(n_rows, dtype=torch.float64).index_add_(0, rows.cpu(), kl.double())
    return out


def response_nll(model, batch_list: list[dict]) -> float:
    """Teacher-forced NLL in nats per response token (labels ≠ −100), micro-averaged over every response
    token of ``batch_list`` (right-padded batches, e.g. from :class:`mtakd.data.Collator`)."""
    total, count = 0.0, 0
    for b in batch_list:
        s = batch_stats(model, b)
        total += float(s["nll"].sum())
        count += int(s["tokens"].sum())
    return total / max(count, 1)
