"""The decoding engine of `mtakd evaluate` and `mtakd generate`: the protocol's GenerationConfig and continuous
batching (:func:`generate`): prompts taken in order of length, ``batch_size`` rows decoded at once, a finished
row refilled by the next prompt; also importable from :mod:`mtakd.evaluate`, which documents the protocol."""

from __future__ import annotations

import torch

from .data import DataError, length_order

GENERATION_BATCH = 32  # sequences decoded at once; continuous batching keeps them busy (BENCHMARKS.md)


def eos_token_ids(model, tokenizer) -> list[int]:
    """EOS ids of the tokenizer and of the model's generation config (e.g. <|im_end|> and <|endoftext|>)."""
    ids = []
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and i not in ids:
                ids.append(int(i))
    if not ids:
        raise DataError("the tokenizer has no EOS token: generation could not stop")
    return ids


def generation_config(model, tokenizer, *, greedy: bool, max_new_tokens: int):
    """The protocol's GenerationConfig; every sampling knob is explicit so nothing is inherited from the
    model's generation_config or from transformers' global defaults (top_k=50)."""
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_ids(model, tokenizer)[0]
    common = dict(
        max_new_tokens=max_new_tokens, min_new_tokens=0, num_beams=1, eos_token_id=eos_token_ids(model, tokenizer),
        pad_token_id=pad, repetition_penalty=1.0, no_repeat_ngram_size=0,
    )
    if greedy:
        return GenerationConfig(do_sample=False, **common)
    sampling = dict(temperature=1.0, top_p=1.0, top_k=0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)
    if getattr(model.generation_config, "min_p", None) is not None:
        sampling["min_p"] = 0.0  # None would inherit the model's value; 0 keeps every token
    return GenerationConfig(do_sample=True, **common, **sampling)


def _left_pad(rows: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions of left-padded rows counted from each row's first real token (transformers' rule)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _check_decoding(gen_config) -> None:
    if gen_config.do_sample and (gen_config.temperature, gen_config.top_p, gen_config.top_k) != (1.0, 1.0, 0):
        raise ConfigError("decode_batch samples at temperature 1, top-p 1, no top-k only (the evaluation protocol); "
                          f"got temperature {gen_config.temperature}, top_p {gen_config.top_p}, top_k {gen_config.top_k}")


def _next_tokens(logits: torch.Tensor, gen_config, vocab: int | None) -> torch.Tensor:
    """Greedy or sampled next tokens among the tokenizer's ids: output rows past ``vocab`` are padding (e.g.
    Qwen's 151,936 rows for 151,665 ids) and never chosen."""
    logits = logits[:, :vocab].float()
    return torch.multinomial(logits.softmax(-1), 1)[:, 0] if gen_config.do_sample else logits.argmax(-1)


def _splice_caches(cache, new, width: int) -> None:
    """Rows of the prefilled cache ``new`` appended to ``cache`` (after its rows); both are left-padded to
    ``width`` positions first (zero keys and values at masked positions; RoPE is already in the keys)."""
    import torch.nn.functional as F

    for a, b in zip(cache.layers, new.layers):
        keys, values = [], []
        for layer in (a, b):
            pad = width - layer.keys.shape[-2]
            keys.append(F.pad(layer.keys, (0, 0, pad, 0)) if pad else layer.keys)
            values.append(F.pad(layer.values, (0, 0, pad, 0)) if pad else layer.values)
        a.keys, a.values = torch.cat(keys), torch.cat(values)


def _decode_stream(model, prompt_ids: list[list[int]], gen_config, rows: int, pad_id: int, vocab: int | None):
    """Yields ``(i, tokens)``: the new tokens of ``prompt_ids[i]`` up to and including its first EOS, as each
    sequence finishes. At most ``rows`` sequences are decoded at once, in one left-padded batch sharing a
    ``DynamicCache``; a finished sequence leaves the batch at once and, while prompts remain, the free rows are
    refilled with the next prompts in the given order (continuous batching): the new prompts are prefilled as a
    left-padded batch of their own, then their cache rows are spliced into the running cache, the shorter side
    left-padded so that both end at the same column. Every row keeps its own positions (counted from its first
    real token) and the attention mask hides the padding, so each sequence is computed as if decoded alone;
    leading columns that are padding in every row are cut. Tokens are chosen among the first ``vocab`` ids."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    _check_decoding(gen_config)
    eos = torch.tensor(gen_config.eos_token_id if isinstance(gen_config.eos_token_id, list)
                       else [gen_config.eos_token_id])
    max_new = gen_config.max_new_tokens
    device = next(model.parameters()).device
    eos = eos.to(device)
    queue = list(range(len(prompt_ids)))[::-1]  # next prompt at the end
    slots: list[int] = []  # prompt index of each batch row
    out: dict[int, list[int]] = {}
    cache = mask = pos = nxt = None
    refill = True
    if max_new < 1:
        yield from ((i, []) for i in range(len(prompt_ids)))
        return
    while queue or slots:
        if queue and (not slots or refill and len(slots) < rows):  # prefill the next prompts, splice them in
            new = [queue.pop() for _ in range(min(rows - len(slots), len(queue)))]
            first = len(slots)  # rows from here on have a new token
            inputs = _left_pad([prompt_ids[i] for i in new], pad_id, device)
            new_cache = DynamicCache(config=model.config)
            new_mask = inputs["attention_mask"]
            new_pos = _position_ids(new_mask)
            logits = model(input_ids=inputs["input_ids"], attention_mask=new_mask, position_ids=new_pos,
                           cache=new_cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            new_nxt, new_pos = _next_tokens(logits, gen_config, vocab), new_pos[:, -1:] + 1
            if cache is None:
                cache, mask, pos, nxt = new_cache, new_mask, new_pos, new_nxt
                # other layer types (sliding windows, ...) cannot be spliced: no refill, rows only leave
                refill = all(type(layer) is DynamicLayer for layer in cache.layers)
            else:
                width = max(mask.shape[1], new_mask.shape[1])
                _splice_caches(cache, new_cache, width)
                mask = torch.cat([torch.nn.functional.pad(m, (width - m.shape[1], 0)) for m in (mask, new_mask)])
                pos, nxt = torch.cat([pos, new_pos]), torch.cat([nxt, new_nxt])
            slots += new
            for i in new:
                out[i] = []
        else:  # one decoding step of every row
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, cache=cache,
                           use_cache=True, logits_to_keep=1).logits[:, -1]
            nxt, pos, first = _next_tokens(logits, gen_config, vocab), pos + 1, 0
        # nxt[first:] are new tokens: record them; finished rows leave
        for i, t in zip(slots[first:], nxt[first:].tolist()):
            out[i].append(t)
        done = [False] * first + torch.isin(nxt[first:], eos).tolist()
        done = [d or len(out[i]) >= max_new for i, d in zip(slots, done)]
        if any(done):
            for i, d in zip(slots, done):
                if d:
                    yield i, out.pop(i)
            keep = [k for k, d in enumerate(done) if not d]
            slots = [slots[k] for k in keep]
            if not slots:
                cache = mask = pos = nxt = None
                continue
            keep = torch.tensor(keep, device=device)
            cache.batch_select_indices(keep)
            mask, pos, nxt = mask[keep], pos[keep], nxt[keep]
            cut = int(mask.any(0).int().argmax())  # leading columns that are padding in every row
            if cut and refill:
                mask = mask[:, cut:]
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, cut:], layer.values[:, :, cut:]


def decode_batch(model, inputs: dict[str, torch.Tensor], gen_config, vocab: int | None = None) -> list[list[int]]:
    """New tokens of each row of a left-padded batch, up to and including its first EOS; ``vocab``: the tokenizer's
    ids (:func:`mtakd.models.vocabulary_ids`; output rows past it are never chosen), None: every row.

    The decoding of ``transformers``' ``generate`` for the protocol's two configurations (greedy; sampling at
    temperature 1, top-p 1, no top-k, i.e. ``torch.multinomial`` on the softmax), on a ``DynamicCache``, with
    one difference: a row that has produced EOS leaves the batch (its rows of the cache are dropped with
    ``DynamicCache.batch_select_indices``), so no compute is spent on finished sequences. Greedy outputs equal
    ``generate``'s; sampled ones equal them while no row has finished (then fewer random draws are made).
    """
    mask = inputs["attention_mask"]
    prompts = [ids[m.bool()].tolist() for ids, m in zip(inputs["input_ids"], mask)]
    out: list[list[int]] = [[] for _ in prompts]
    for i, tokens in _decode_stream(model, prompts, gen_config, rows=len(prompts), pad_id=gen_config.pad_token_id,
                                    vocab=vocab):
        out[i] = tokens
    return out


def generate(
    model, tokenizer, prompt_ids: list[list[int]], *, seed: int, gen_config, batch_size: int = GENERATION_BATCH,
    desc: str = "", progress: bool = True, stats: dict | None = None,
) -> list[str]:
    """Decoded, stripped responses in the order of ``prompt_ids``. Prompts are taken in order of length and
    decoded ``batch_size`` at a time by continuous batching (:func:`_decode_stream`): a sequence leaves the
    batch when it has produced EOS and the next prompt takes its row, so every decoding step runs at (nearly)
    the full batch and no step is spent waiting for a batch's longest response. ``stats``, if given, receives
    ``new_tokens``: the number of generated tokens (up to and including EOS). Only the tokenizer's ids are
    generated: padded output rows (:func:`mtakd.models.vocabulary_ids`) never are."""
    from tqdm.auto import tqdm
    from transformers import set_seed

    from .models import vocabulary_ids

    eos = set(gen_config.eos_token_id if isinstance(gen_config.eos_token_id, list) else [gen_config.eos_token_id])
    order = length_order([len(p) for p in prompt_ids])  # continuous batching takes them in this order
    out: list[str] = [""] * len(prompt_ids)
    n_new = 0
    set_seed(seed)
    with torch.inference_mode(), tqdm(total=len(prompt_ids), desc=desc or f"seed {seed}", unit="prompt",
                                      disable=not progress) as bar:
        for k, tokens in _decode_stream(model, [prompt_ids[i] for i in order], gen_config, rows=batch_size,
                                        pad_id=gen_config.pad_token_id, vocab=vocabulary_ids(tokenizer)):
            n_new += len(tokens)
            stop = len(tokens) - 1 if tokens and tokens[-1] in eos else len(tokens)
            out[order[k]] = tokenizer.decode(tokens[:stop], skip_special_tokens=True).strip()
            bar.update(1)
    if stats is not None:
        stats["new_tokens"] = n_new
    return out
