"""Teacher-forced metrics of a causal LM on reference responses: negative log-likelihood (nats per token) and
KL(teacher ‖ student) over the full vocabulary, at the response positions (labels ≠ −100).

One implementation for every caller: ``mtakd evaluate --metrics nll kl`` (:mod:`mtakd.evaluate`) and the
held-out response NLL that ``mtakd student`` reports (:func:`response_nll`). The KL is the forward KL of
the distillation objectives (MTA_SPEC §2, the logit-distillation base ``L_base``) measured instead of trained:
``Σ_v p_T(v) (log p_T(v) − log p_S(v))`` per position.

Batches are right-padded (``input_ids``, ``attention_mask``, ``labels`` with −100 on the prompt and the
padding), so positions count from each row's first token and a row's values do not depend on its batch.
Only the logits from the first response position of the batch onwards are computed (``logits_to_keep``),
and the per-position terms are evaluated on the response positions only, in chunks, so memory stays at
about one ``[batch, response, vocabulary]`` logits tensor per model.

Several models scored against one teacher in one process (``benchmarks/quality.py``) share a
:class:`TeacherReference`: the teacher runs once per distinct batch.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

CHUNK = 1024  # response positions per log-softmax chunk


def _response_logits(model, batch: dict, first: int) -> torch.Tensor:
    """Logits predicting tokens ``first .. T−1`` of the batch: ``[B, T − first, V]``."""
    ids = batch["input_ids"]
    keep = ids.shape[1] - first + 1  # logits at positions first−1 .. T−1; the last predicts nothing
    device = next(model.parameters()).device
    out = model(input_ids=ids.to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False,
                logits_to_keep=keep)
    return out.logits[:, :-1]


class TeacherReference:
    """The teacher of the KL, remembering its last hidden state at the response positions of each batch it has
    scored. A batch seen again (the same set scored for another model) costs only the LM head on those
    ``[N, d]`` states, not a forward pass; ``[N, V]`` logits are never kept. A model whose logits are more than
    ``head(last hidden state)`` (soft-capping, logit scaling) is run every time."""

    def __init__(self, model, remember: bool = True):
        from .trainer import _plain_head

        self.model = model
        self.remember = remember and _plain_head(model)
        self._states: dict[str, torch.Tensor] = {}

    def response_logits(self, batch: dict, first: int, resp: torch.Tensor) -> torch.Tensor:
        """``[N, V]`` float logits at the response positions ``resp`` (of positions ``first ..``) of ``batch``."""
        if not self.remember:
            return _response_logits(self.model, batch, first)[resp].float()
        key = hashlib.sha1(b"".join(batch[k].cpu().numpy().tobytes() for k in ("input_ids", "attention_mask", "labels"))
                           + str((tuple(batch["input_ids"].shape), first)).encode()).hexdigest()
        if key not in self._states:
            device = next(self.model.parameters()).device
            out = self.model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                             use_cache=False, output_hidden_states=True, logits_to_keep=1)
            self._states[key] = out.hidden_states[-1][:, first - 1 : -1][resp.to(device)]
        return self.model.get_output_embeddings()(self._states[key]).float()


def batch_stats(model, batch: dict, teacher=None) -> dict[str, torch.Tensor]:
    """Per row of a right-padded batch: ``nll`` (summed nats over its response tokens), ``tokens`` (their
    count) and, with ``teacher`` (a model or a :class:`TeacherReference`), ``kl`` (summed KL(teacher ‖ model)
    over the same positions). One forward pass per model, no gradients."""
    labels = batch["labels"]
    resp = labels != -100
    if not resp.any():
        raise ValueError("teacher-forced metrics: the batch has no response tokens (every label is -100)")
    first = int(resp.any(0).nonzero()[0])
    first = max(first, 1)  # the first token of a sequence has no prediction
    labels, resp = labels[:, first:], resp[:, first:]
    rows = resp.nonzero()[:, 0]
    with torch.inference_mode():
        s_logits = _response_logits(model, batch, first)[resp].float()  # [N, V], N response tokens
        if teacher is not None and not isinstance(teacher, TeacherReference):
            teacher = TeacherReference(teacher, remember=False)
        t_logits = teacher.response_logits(batch, first, resp) if teacher is not None else None
        if t_logits is not None and t_logits.shape[-1] != s_logits.shape[-1]:
            raise ValueError(f"teacher-forced KL: the teacher has {t_logits.shape[-1]} output rows, the model "
                             f"{s_logits.shape[-1]}; both must share one tokenizer and vocabulary")
        target = labels[resp].to(s_logits.device)
        nll, kl = torch.empty(len(target)), torch.empty(len(target))
        for i in range(0, len(target), CHUNK):
            logp = F.log_softmax(s_logits[i:i + CHUNK], -1)
            nll[i:i + CHUNK] = -logp.gather(-1, target[i:i + CHUNK, None])[:, 0].cpu()
            if t_logits is not None:
                logq = F.log_softmax(t_logits[i:i + CHUNK].to(logp.device), -1)
                kl[i:i + CHUNK] = F.kl_div(logp, logq, log_target=True, reduction="none").sum(-1).cpu()
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
