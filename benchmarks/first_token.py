"""What a trained student says first: the next-token distribution at the first response position.

    python benchmarks/first_token.py runs/quality-random --out benchmarks/results/quality-study/first-token-random.json

For every trained unit of a quality study (``DIR/<arm>/seed<N>/train/student``) and every prompt of the evaluation
sets (rendered as ``mtakd evaluate`` renders it: chat template, prompt ≤ 256 tokens): the probability of the
end-of-turn token(s), and whether the greedy first token is end-of-turn or blank (decodes to whitespace only). A
greedy answer that starts blank tends to stay blank (``\\n`` repeated), which ``mtakd evaluate`` counts as an
empty generation (ROUGE-L 0). Prints mean ± sample std over training seeds per arm; ``--out`` keeps every seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_study.plan import DEFAULT_SETS, EVAL_SETS, SHARED_DATA  # noqa: E402  (the study's sets and data)


@torch.no_grad()
def first_token(model, tok, prompts) -> dict:
    """Mean P(end-of-turn), share of greedy end-of-turn and of greedy blank first tokens over ``prompts``."""
    from mtakd.evaluate import eos_token_ids

    eos = eos_token_ids(model, tok)
    p_eos, top_eos, top_blank = [], [], []
    for p in prompts:
        probs = model(torch.tensor([p.ids])).logits[0, -1].float().softmax(-1)
        top = int(probs.argmax())
        p_eos.append(float(probs[eos].sum()))
        top_eos.append(top in eos)
        top_blank.append(top not in eos and not tok.decode([top]).strip())
    return {"p_eos": float(np.mean(p_eos)), "greedy_eos": float(np.mean(top_eos)),
            "greedy_blank": float(np.mean(top_blank)), "prompts": len(prompts)}


def main(argv=None) -> int:
    from mtakd.config import ModelSource
    from mtakd.evaluate import encode_prompts, load_eval_sets
    from mtakd.models import load_model, load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study", type=Path, help="a quality study's --out directory")
    ap.add_argument("--sets", nargs="+", default=DEFAULT_SETS, choices=list(EVAL_SETS))
    ap.add_argument("--out", type=Path, help="JSON with every arm and seed")
    args = ap.parse_args(argv)
    students = sorted(args.study.glob("*/seed*/train/student"))
    if not students:
        raise SystemExit(f"first_token: no trained student under {args.study}/<arm>/seed<N>/train/student")
    tok = load_tokenizer(ModelSource(path=str(students[0])))
    records = [r for rs in load_eval_sets([str(SHARED_DATA / EVAL_SETS[s]) for s in args.sets]).values() for r in rs]
    prompts = encode_prompts(records, tok, template="chat", system_prompt=None, max_prompt_length=256)
    result: dict = {}
    for path in students:
        arm, seed = path.parents[2].name, path.parents[1].name
        result.setdefault(arm, {})[seed] = first_token(load_model(ModelSource(path=str(path))).eval(), tok, prompts)
        print(arm, seed, result[arm][seed], flush=True)
    for arm, by in result.items():
        cells = {k: [v[k] for v in by.values()] for k in ("p_eos", "greedy_eos", "greedy_blank")}
        print(f"{arm:>20}: " + ", ".join(f"{k} {np.mean(v):.4f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.4f}"
                                         for k, v in cells.items()))
    if args.out:
        args.out.write_text(json.dumps({"study": str(args.study), "sets": args.sets, "arms": result}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
