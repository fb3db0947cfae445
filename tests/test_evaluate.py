"""mtakd.evaluate on a tiny random Llama with a BPE tokenizer trained in the test (no downloads)."""

from __future__ import annotations

import json

import pytest
import torch

from mtakd import evaluate
from mtakd.data import DataError, Record
from mtakd.evaluate import evaluate_model, generate, generation_config, rouge_l
from tests.conftest import run_subcommand

SENTENCES = [
    "The cat sat on the mat and looked at the bird.",
    "Write a short poem about the sea and the sky.",
    "Explain why the sky is blue in simple words.",
    "Summarise the following text in one sentence.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Input: ### Response:",
    "A dog runs in the park with a red ball.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES * 5, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", chat_template=CHAT_TEMPLATE
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, tokenizer, directory) of a tiny random Llama saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer, path


def _records(n=5, where="mem"):
    texts = ["Write a poem.", "Explain the sky to a child in a few simple words please.", "Summarise: the cat sat.",
             "Name a dog.", "Why is the sea blue and the sky too, and what about the bird on the mat?"]
    return [Record(texts[i % 5], "", "the cat sat on the mat", f"{where}:{i + 1}") for i in range(n)]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cli(argv):
    return run_subcommand(evaluate, argv)


# ---------------------------------------------------------------------------------------- ROUGE-L
@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        # LCS "the cat on the mat" = 5 of 6 tokens each: P = R = F = 5/6
        ("the cat sat on the mat", "the cat lay on the mat", 100 * 5 / 6),
        # LCS "a c" = 2; P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7
        ("a b c d", "a c e", 100 * 4 / 7),
        # stemming: cats->cat, running->run, runs->run; "the"/"were" stay: [the cat were run] vs [a cat run],
        # LCS "cat run" = 2 -> F = 4/7 (0 without the stemmer)
        ("the cats were running", "a cat runs", 100 * 4 / 7),
        # case and punctuation are dropped by the rouge-score tokenizer
        ("Hello, World!", "hello world", 100.0),
        ("", "the reference", 0.0),
        ("nothing shared", "the reference", 0.0),
    ],
)
def test_rouge_l_hand_computed(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-9)


# ------------------------------------------------------------------------------------- generation
def test_sampling_config_has_no_top_k(tiny):
    model, tok, _ = tiny
    model.generation_config.top_k = 5  # a model-level default must not leak in
    try:
        cfg = generation_config(model, tok, greedy=False, max_new_tokens=8)
        effective, _ = model._prepare_generation_config(cfg)  # what generate() uses
        assert effective.do_sample and effective.top_k == 0 and effective.top_p == 1.0
        assert effective.temperature == 1.0
    finally:
        model.generation_config.top_k = None


def _prompt_ids(tok, records, template="chat"):
    return [p.ids for p in evaluate.encode_prompts(records, tok, template=template, system_prompt=None,
                                                   max_prompt_length=64)]


def test_generation_reproducible_per_seed(tiny):
    model, tok, _ = tiny
    ids = _prompt_ids(tok, _records())
    cfg = generation_config(model, tok, greedy=False, max_new_tokens=12)
    kw = dict(gen_config=cfg, batch_size=2, progress=False)
    first = generate(model, tok, ids, seed=10, **kw)
    again = generate(model, tok, ids, seed=10, **kw)
    other = generate(model, tok, ids, seed=20, **kw)
    assert first == again
    assert first != other


def test_left_padded_batches_match_single_prompts(tiny):
    model, tok, _ = tiny
    ids = _prompt_ids(tok, _records())
    assert len({len(i) for i in ids}) > 1  # really padded
    cfg = generation_config(model, tok, greedy=True, max_new_tokens=8)
    batched = generate(model, tok, ids, seed=0, gen_config=cfg, batch_size=5, progress=False)
    single = generate(model, tok, ids, seed=0, gen_config=cfg, batch_size=1, progress=False)
    assert batched == single


def test_progress_bar_counts_prompts_not_batches(tiny, monkeypatch):
    """5 prompts decoded 2 at a time: the bar advances by one prompt as each finishes, to 5 of 5 (not 3 batches)."""
    import tqdm.auto

    bars = []

    class Recording(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})
            self.record = {"total": kwargs.get("total"), "unit": kwargs.get("unit"), "updates": []}
            bars.append(self.record)

        def update(self, n=1):
            self.record["updates"].append(n)
            return super().update(n)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    model, tok, _ = tiny
    cfg = generation_config(model, tok, greedy=True, max_new_tokens=2)
    generate(model, tok, _prompt_ids(tok, _records(5)), seed=0, gen_config=cfg, batch_size=2)
    assert bars == [{"total": 5, "unit": "prompt", "updates": [1, 1, 1, 1, 1]}]


def test_evaluate_model_in_process(tiny):
    model, tok, _ = tiny
    model.train()
    m = evaluate_model(model, tok, {"a": _records(3)}, seeds=[1, 2], max_new_tokens=6, batch_size=2,
                       max_prompt_length=4, progress=False)
    assert model.training  # restored
    assert tok.padding_side == "right"  # not modified
    s = m["sets"]["a"]
    assert s["n"] == 3 and set(s["per_seed"]) == {"1", "2"} and s["prompts_truncated"] == 3
    assert len(m["per_prompt"]["a"]["rougeL"]) == 3 and set(m["per_prompt"]["a"]) == {"rougeL"}
    assert m["average"]["mean"] == pytest.approx(s["mean"])
    assert m["protocol"]["top_k"] == 0 and m["protocol"]["template"] == "chat"


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_evaluate_writes_outputs(tiny, tmp_path):
    _, tok, model_dir = tiny
    rows = [{"instruction": r.instruction, "input": "", "output": r.output} for r in _records(5)]
    data_a = _write_jsonl(tmp_path / "alpha.jsonl", rows)
    data_b = _write_jsonl(tmp_path / "beta.jsonl", rows[:2])
    out = tmp_path / "eval"
    rc = _cli(["evaluate", "--model", str(model_dir), "--data", str(data_a), str(data_b), "--out", str(out),
               "--seeds", "10", "20", "--max-new-tokens", "8", "--batch-size", "2"])
    assert rc == 0
    for name, n in (("alpha", 5), ("beta", 2)):
        for seed in (10, 20):
            lines = (out / "generations" / f"{name}_seed{seed}.jsonl").read_text().splitlines()
            gens = [json.loads(l) for l in lines]
            assert len(gens) == n
            assert set(gens[0]) == {"prompt", "reference", "generation", "rougeL"}
            # input order, although batches are sorted by prompt length
            assert [g["prompt"] for g in gens] == [
                tok.apply_chat_template([{"role": "user", "content": r["instruction"]}], tokenize=False,
                                        add_generation_prompt=True) for r in rows[:n]
            ]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"model", "protocol", "sets", "average", "per_prompt", "time_s"}
    assert metrics["protocol"]["seeds"] == [10, 20]
    assert metrics["sets"]["alpha"]["n"] == 5 and len(metrics["per_prompt"]["beta"]["rougeL"]) == 2
    mean = (metrics["sets"]["alpha"]["mean"] + metrics["sets"]["beta"]["mean"]) / 2
    assert metrics["average"]["mean"] == pytest.approx(mean)
    md = (out / "metrics.md").read_text()
    assert "| alpha | 5 |" in md and "**average**" in md


def test_cli_uses_training_prompt_format(tiny, tmp_path):
    """mtakd_run.json next to the model decides the template (here raw) unless --template is given."""
    model, tok, _ = tiny
    model_dir = tmp_path / "student"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    (model_dir / "mtakd_run.json").write_text(json.dumps({"data": {"template": "raw", "system_prompt": None}}))
    data = _write_jsonl(tmp_path / "s.jsonl", [{"instruction": "Name a dog.", "output": "Rex"}])
    out = tmp_path / "eval"
    _cli(["evaluate", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--seeds", "1",
          "--max-new-tokens", "2"])
    gen = json.loads((out / "generations" / "s_seed1.jsonl").read_text())
    assert gen["prompt"] == "Name a dog.\n"
    assert json.loads((out / "metrics.json").read_text())["protocol"]["template"] == "raw"


@pytest.mark.parametrize("bad", [{"instruction": "No answer here."}, {"instruction": "Empty.", "output": "  "}])
def test_missing_reference_names_file_and_line(tmp_path, bad):
    data = _write_jsonl(tmp_path / "refs.jsonl", [{"instruction": "Fine.", "output": "ok"}, bad])
    with pytest.raises(DataError, match=r"refs\.jsonl:2: missing or empty reference"):
        _cli(["evaluate", "--model", str(tmp_path / "never-loaded"), "--data", str(data), "--out",
              str(tmp_path / "o")])


def test_missing_local_model_directory_is_named_without_contacting_the_hub(tmp_path, no_hub):
    """`--model runs/nothing` next to a `runs/` directory is a local path: say it does not exist (before, the
    hub was asked for a model "runs/nothing" and the error was a failed connection)."""
    data = _write_jsonl(tmp_path / "s.jsonl", [{"instruction": "Name a dog.", "output": "Rex"}])
    from mtakd.models import ModelError

    with pytest.raises(ModelError, match=r"model directory not found: runs/nothing \(no directory .*runs/nothing; read as a local path"):
        _cli(["evaluate", "--model", "runs/nothing", "--data", str(data), "--out", str(tmp_path / "o")])


def test_missing_reference_in_process(tiny):
    model, tok, _ = tiny
    recs = _records(2) + [Record("Q", "", "", "mine.jsonl:7")]
    with pytest.raises(DataError, match=r"mine\.jsonl:7"):
        evaluate_model(model, tok, {"x": recs}, seeds=[1], max_new_tokens=2, progress=False)


# ------------------------------------------------------------------------------ faster generation
def test_greedy_equals_unsorted_one_by_one_transformers_generate(tiny):
    """Sorted, left-padded batches with finished rows dropped give exactly what transformers' generate gives
    for each prompt alone (no padding, input order)."""
    model, tok, _ = tiny
    records = _records(5) + [Record("Name a cat and a dog and a bird please.", "", "x", "m:6")]
    ids = _prompt_ids(tok, records)
    cfg = generation_config(model, tok, greedy=True, max_new_tokens=10)
    ours = generate(model, tok, ids, seed=0, gen_config=cfg, batch_size=4, progress=False)
    eos = set(cfg.eos_token_id)
    ref = []
    with torch.inference_mode():
        for i in ids:
            new = model.generate(torch.tensor([i]), attention_mask=torch.ones(1, len(i), dtype=torch.long),
                                 generation_config=cfg)[0, len(i):].tolist()
            stop = next((k for k, t in enumerate(new) if t in eos), len(new))
            ref.append(tok.decode(new[:stop], skip_special_tokens=True).strip())
    assert ours == ref


def test_finished_rows_leave_the_batch(tiny):
    """A row that has produced EOS is not computed any more: the forward passes shrink to the rows still
    generating, and each row's tokens stop at its EOS."""
    from mtakd.decoding import _left_pad, decode_batch

    model, tok, _ = tiny
    ids = _prompt_ids(tok, _records(4))
    cfg = generation_config(model, tok, greedy=True, max_new_tokens=6)
    inputs = _left_pad(ids, cfg.pad_token_id, "cpu")
    with torch.inference_mode():
        free = decode_batch(model, inputs, cfg)
    # a token that one row (r) produces at step k and no row produces earlier: as EOS, row r stops after
    # step k, the others go on
    r, k, stop_token = next((r, k, row[k]) for k in range(6) for r, row in enumerate(free)
                            if sum(t == row[k] for other in free for t in other[:k + 1]) == 1)
    cfg.eos_token_id = [stop_token]
    sizes = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        with torch.inference_mode():
            out = decode_batch(model, inputs, cfg)
    finally:
        hook.remove()
    assert out[r] == free[r][:k + 1]
    assert sizes[:k + 1] == [4] * (k + 1) and sizes[k + 1] == 3
    for row, ref in zip(out, free):  # the same greedy tokens, cut at the (new) EOS
        cut = next((j + 1 for j, t in enumerate(ref) if t == stop_token), len(ref))
        assert row == ref[:cut]



def test_freed_rows_are_refilled_and_greedy_still_equals_generate_alone(tiny):
    """Continuous batching: when a sequence ends, the next prompt is prefilled on its own and spliced into the
    running batch (with a different left padding); every output still equals transformers' generate on the
    prompt alone, and every decoding step before the last prompt has started runs with the full batch."""
    model, tok, _ = tiny
    records = _records(5) + [Record("Name a cat and a dog and a bird please.", "", "x", "m:6"),
                             Record("Sky?", "", "x", "m:7")]
    ids = _prompt_ids(tok, records)
    cfg = generation_config(model, tok, greedy=True, max_new_tokens=12)

    def alone(cfg):
        out = []
        with torch.inference_mode():
            for i in ids:
                new = model.generate(torch.tensor([i]), attention_mask=torch.ones(1, len(i), dtype=torch.long),
                                     generation_config=cfg)[0, len(i):].tolist()
                out.append(new)
        return out

    free = alone(cfg)
    # an EOS that ends some sequences early (at different steps) and not others
    cfg.eos_token_id = [min({t for row in free for t in row[1:6]},
                            key=lambda t: abs(sum(t in row for row in free) - len(free) / 2))]
    ref = alone(cfg)
    lengths = [len(r) for r in ref]
    assert min(lengths) < 12 and max(lengths) == 12, lengths
    calls = []  # (batch rows, tokens per row) of every forward pass
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    try:
        ours = generate(model, tok, ids, seed=0, gen_config=cfg, batch_size=3, progress=False)
    finally:
        hook.remove()
    eos = set(cfg.eos_token_id)
    assert ours == [tok.decode([t for t in r if t not in eos], skip_special_tokens=True).strip() for r in ref]
    prefills = [k for k, (_, n) in enumerate(calls) if n > 1]
    assert len(prefills) > 2  # the first three prompts, then refills
    assert sum(calls[k][0] for k in prefills) == len(ids)
    assert all(calls[k][0] == 3 for k in range(prefills[-1]) if calls[k][1] == 1)
    assert sum(b for b, n in calls if n == 1) == sum(lengths) - len(ids)  # no finished row is computed

# ---------------------------------------------------------------------------- list references
def test_list_references_score_the_best_and_load(tmp_path):
    """`output` as a list (S-NI): ROUGE-L is the max over the references; nll uses the first; the generation
    files keep the list; an empty list or a non-string element is a clear error."""
    from mtakd.data import load_records

    data = _write_jsonl(tmp_path / "sni.jsonl", [
        {"instruction": "Title?", "output": ["a dog runs", "the cat sat on the mat"]},
        {"instruction": "Other?", "output": "the cat sat"},
    ])
    recs = load_records(str(data), require_output=False)
    assert recs[0].output == "a dog runs" and recs[0].all_references == ("a dog runs", "the cat sat on the mat")
    assert recs[1].all_references == ("the cat sat",)
    assert evaluate.best_rouge_l("the cat sat on the mat", recs[0].all_references) == pytest.approx(100.0)
    assert evaluate.best_rouge_l("", recs[0].all_references) == 0.0
    # training on such a record uses the first reference
    assert load_records(str(data))[0].output == "a dog runs"
    for bad, match in (([], "one or more strings"), (["ok", 3], "one or more strings")):
        with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'output' as a list"):
            load_records(str(_write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x", "output": bad}])))
    with pytest.raises(DataError, match=r"refs\.jsonl:1: missing or empty reference"):
        evaluate.load_eval_sets([str(_write_jsonl(tmp_path / "refs.jsonl", [{"instruction": "x", "output": ["a", " "]}]))])


def test_evaluate_list_references_end_to_end(tiny, tmp_path, monkeypatch):
    """The per-prompt score is the best reference's: with a generation fixed to the second reference, 100."""
    model, tok, _ = tiny
    monkeypatch.setattr(evaluate, "generate", lambda m, t, ids, **kw: ["the cat sat on the mat"] * len(ids))
    recs = [Record("Q", "", "a dog runs", "m:1", references=("a dog runs", "the cat sat on the mat"))]
    m = evaluate_model(model, tok, {"s": recs}, seeds=[1], greedy=True, progress=False, out_dir=tmp_path)
    assert m["per_prompt"]["s"]["rougeL"] == [pytest.approx(100.0)]
    gen = json.loads((tmp_path / "generations" / "s_seed1.jsonl").read_text())
    assert gen["reference"] == ["a dog runs", "the cat sat on the mat"]


# ------------------------------------------------------------------------ teacher-forced metrics
def _slow_nll(model, prompt_ids, response_ids):
    """Token by token: −log p(token | everything before it), one forward pass per position."""
    seq = prompt_ids + response_ids
    total = 0.0
    with torch.inference_mode():
        for j in range(len(prompt_ids), len(seq)):
            logits = model(torch.tensor([seq[:j]])).logits[0, -1].double()
            total -= float(torch.log_softmax(logits, -1)[seq[j]])
    return total / len(response_ids)


def _slow_kl(student, teacher, prompt_ids, response_ids):
    seq = prompt_ids + response_ids
    kls = []
    with torch.inference_mode():
        for j in range(len(prompt_ids), len(seq)):
            p = torch.softmax(teacher(torch.tensor([seq[:j]])).logits[0, -1].double(), -1)
            q = torch.softmax(student(torch.tensor([seq[:j]])).logits[0, -1].double(), -1)
            kls.append(float((p * (p.log() - q.log())).sum()))
    return sum(kls) / len(kls)


def _other_model(tok, seed=3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=False)).eval()


def test_teacher_forced_matches_slow_reference_and_ignores_batching(tiny):
    model, tok, _ = tiny
    teacher = _other_model(tok)
    records = [Record(r.instruction, "", out, r.where) for r, out in zip(
        _records(5), ["the cat", "a dog runs in the park with a red ball", "sky", "the sea and the sky", "ok"])]
    prompts = evaluate.encode_prompts(records, tok, template="chat", system_prompt=None, max_prompt_length=64)
    by_one = evaluate.teacher_forced(model, tok, records, template="chat", max_prompt_length=64, teacher=teacher, batch_size=1)
    by_three = evaluate.teacher_forced(model, tok, records, template="chat", max_prompt_length=64, teacher=teacher, batch_size=3)
    by_all = evaluate.teacher_forced(model, tok, records, template="chat", max_prompt_length=64, teacher=teacher, batch_size=5)
    for k in ("nll", "kl"):
        close = pytest.approx(by_one[k], rel=1e-5, abs=1e-6)  # float noise of other batch shapes
        assert by_three[k] == close and by_all[k] == close
    assert by_one["tokens"] == by_three["tokens"] == by_all["tokens"]
    for i, (p, r) in enumerate(zip(prompts, records)):
        resp = tok(r.output, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # response + end of turn
        assert by_one["tokens"][i] == len(resp)
        assert by_one["nll"][i] == pytest.approx(_slow_nll(model, p.ids, resp), rel=1e-4)
        assert by_one["kl"][i] == pytest.approx(_slow_kl(model, teacher, p.ids, resp), rel=1e-3)
    self_kl = evaluate.teacher_forced(model, tok, records, template="chat", max_prompt_length=64, teacher=model, batch_size=2)["kl"]
    assert max(abs(v) for v in self_kl) < 1e-5


def test_teacher_forced_reads_logits_in_chunks_with_or_without_a_plain_head(tiny, monkeypatch):
    """Logits built CHUNK response positions at a time from the last hidden state (a plain head) or read from the
    model's logits (a head with soft-capping: Llama ignores the flag, so both paths must agree exactly)."""
    from mtakd import metrics

    model, tok, _ = tiny
    teacher = _other_model(tok)
    records = [Record(r.instruction, "", out, r.where) for r, out in zip(_records(3), ["the cat", "a dog runs", "sky"])]
    prompts = evaluate.encode_prompts(records, tok, template="chat", system_prompt=None, max_prompt_length=64)
    whole = evaluate.teacher_forced(model, tok, records, template="chat", max_prompt_length=64, teacher=teacher, batch_size=3)
    monkeypatch.setattr(metrics, "CHUNK", 2)
    chunked = evaluate.teacher_forced(model, tok, records, template="chat", max_prompt_length=64, teacher=teacher, batch_size=3)
    for m in (model, teacher):
        m.config.final_logit_softcapping = 30.0  # not a plain head any more: the full-logits path
    try:
        capped = evaluate.teacher_forced(model, tok, records, template="chat", max_prompt_length=64, teacher=teacher, batch_size=3)
    finally:
        for m in (model, teacher):
            m.config.final_logit_softcapping = None
    for k in ("nll", "kl"):
        assert chunked[k] == pytest.approx(whole[k], rel=1e-5) and capped[k] == pytest.approx(whole[k], rel=1e-5)


def test_teacher_reference_runs_the_teacher_once_per_batch_and_matches(tiny):
    from mtakd.metrics import TeacherReference

    model, tok, _ = tiny
    teacher, other = _other_model(tok), _other_model(tok, seed=5)
    records = [Record(r.instruction, "", out, r.where) for r, out in zip(
        _records(4), ["the cat", "a dog runs in the park", "sky", "the sea and the sky"])]
    prompts = evaluate.encode_prompts(records, tok, template="chat", system_prompt=None, max_prompt_length=64)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    ref = TeacherReference(teacher)
    for student in (model, other, model):  # three models scored against one teacher
        got = evaluate.teacher_forced(student, tok, records, template="chat", max_prompt_length=64, teacher=ref, batch_size=3)
        plain = evaluate.teacher_forced(student, tok, records, template="chat", max_prompt_length=64, teacher=_other_model(tok), batch_size=3)
        assert got["kl"] == pytest.approx(plain["kl"], rel=1e-5, abs=1e-7) and got["nll"] == plain["nll"]
    assert len(calls) == 2  # two batches, the teacher's forward pass ran once for each
    assert max(abs(v) for v in evaluate.teacher_forced(teacher, tok, records, template="chat", max_prompt_length=64, teacher=ref)["kl"]) < 1e-5


def test_max_response_length_scores_the_first_tokens(tiny):
    model, tok, _ = tiny
    records = [Record(r.instruction, "", out, r.where) for r, out in zip(
        _records(2), ["a dog runs in the park with a red ball", "ok"])]
    prompts = evaluate.encode_prompts(records, tok, template="chat", system_prompt=None, max_prompt_length=64)
    full = tok(records[0].output, add_special_tokens=False)["input_ids"]
    short_len = len(tok("ok", add_special_tokens=False)["input_ids"])
    cap = 3
    assert len(full) > cap >= short_len
    got = evaluate.teacher_forced(model, tok, records, template="chat", max_prompt_length=64, max_response_length=cap)
    assert got["tokens"] == [cap, short_len + 1]  # cut: no end-of-turn token; fits: its EOS is scored
    assert got["nll"][0] == pytest.approx(_slow_nll(model, prompts[0].ids, full[:cap]), rel=1e-4)
    assert got["nll"][1] == pytest.approx(evaluate.teacher_forced(model, tok, records, template="chat", max_prompt_length=64)["nll"][1])
    with pytest.raises(Exception, match="max_response_length must be positive"):
        evaluate.teacher_forced(model, tok, records, template="chat", max_prompt_length=64, max_response_length=0)


def test_evaluate_nll_only_generates_nothing(tiny, tmp_path, monkeypatch):
    model, tok, _ = tiny

    def no_generation(*a, **k):
        raise AssertionError("generated")

    monkeypatch.setattr(evaluate, "generate", no_generation)
    scored_rows = []
    tf = evaluate.teacher_forced
    monkeypatch.setattr(evaluate, "teacher_forced", lambda *a, **k: scored_rows.append(k["batch_size"]) or tf(*a, **k))
    recs = [Record(r.instruction, "", out, r.where) for r, out in zip(_records(3), ["the cat", "a dog", "sky blue"])]
    m = evaluate_model(model, tok, {"s": recs}, metrics=["nll"], progress=False, out_dir=tmp_path, batch_size=5,
                       score_batch_size=2)
    assert scored_rows == [2] and m["protocol"]["score_batch_size"] == 2  # scoring has its own batch size
    s, pp = m["sets"]["s"], m["per_prompt"]["s"]
    assert set(pp) == {"nll", "tokens"} and "mean" not in s and "kl" not in s
    micro = sum(n * t for n, t in zip(pp["nll"], pp["tokens"])) / sum(pp["tokens"])
    assert s["nll"] == pytest.approx(micro) and s["ppl"] == pytest.approx(float(torch.tensor(micro).exp()))
    assert s["tokens"] == sum(pp["tokens"]) and m["average"] == {"nll": s["nll"], "ppl": s["ppl"]}
    assert not (tmp_path / "generations").exists()
    rows = [json.loads(l) for l in (tmp_path / "teacher_forced" / "s.jsonl").read_text().splitlines()]
    assert [r["nll"] for r in rows] == pp["nll"] and rows[0]["tokens"] == pp["tokens"][0]
    assert "NLL" in (tmp_path / "metrics.md").read_text()
    with pytest.raises(Exception, match="kl needs a teacher"):
        evaluate_model(model, tok, {"s": recs}, metrics=["kl"], progress=False)


def test_cli_metrics_with_teacher(tiny, tmp_path):
    _, tok, model_dir = tiny
    teacher_dir = tmp_path / "teacher"
    _other_model(tok).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    data = _write_jsonl(tmp_path / "sni.jsonl", [{"instruction": "Name a dog.", "output": ["Rex", "Fido"]},
                                                 {"instruction": "Name a cat.", "output": "Tom"}])
    out = tmp_path / "eval"
    assert _cli(["evaluate", "--model", str(model_dir), "--teacher", str(teacher_dir), "--data", str(data),
                 "--out", str(out), "--metrics", "rougeL", "nll", "kl", "--greedy", "--max-new-tokens", "3"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["metrics"] == ["rougeL", "nll", "kl"]
    assert {"mean", "nll", "ppl", "kl", "tokens"} <= set(m["sets"]["sni"])
    assert set(m["per_prompt"]["sni"]) == {"rougeL", "nll", "tokens", "kl"}
    # the first reference ("Rex") is the NLL's response
    assert m["per_prompt"]["sni"]["tokens"][0] == len(tok("Rex", add_special_tokens=False)["input_ids"]) + 1
    from mtakd.config import ConfigError

    with pytest.raises(ConfigError, match="kl needs --teacher"):
        _cli(["evaluate", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--metrics", "kl"])
    with pytest.raises(ConfigError, match="only used by --metrics kl"):
        _cli(["evaluate", "--model", str(model_dir), "--teacher", str(teacher_dir), "--data", str(data),
              "--out", str(out), "--metrics", "nll"])


def test_kl_needs_the_same_tokenizer(tiny):
    from mtakd.models import ModelError
    from tests.conftest import build_tokenizer

    model, tok, _ = tiny
    recs = [Record("Q", "", "a dog runs", "m:1")]
    with pytest.raises(ModelError, match="teacher and model must share a tokenizer .* token-to-id maps differ"):
        evaluate_model(model, tok, {"s": recs}, metrics=["kl"], teacher=model, teacher_tokenizer=build_tokenizer(200),
                       progress=False)


def _tiny_granite(tok, seed, scaling=8.0):
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(seed)
    return GraniteForCausalLM(GraniteConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, logits_scaling=scaling, tie_word_embeddings=False)).eval()


def test_teacher_forced_metrics_follow_heads_that_scale_their_logits(tiny):
    """Granite divides its logits by config.logits_scaling, which plain_head cannot see: the runtime guard (the
    head of the last hidden state against the returned last logits) must send both models to their full logits."""
    from mtakd.data import Collator, Example
    from mtakd.metrics import TeacherReference, batch_stats

    _, tok, _ = tiny
    model, teacher = _tiny_granite(tok, 1), _tiny_granite(tok, 2, scaling=4.0)
    records = [Record(r.instruction, "", out, r.where) for r, out in zip(_records(3), ["the cat", "a dog runs", "sky"])]
    prompts = evaluate.encode_prompts(records, tok, template="chat", system_prompt=None, max_prompt_length=64)
    resps = [tok(r.output, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in records]
    batch = Collator(tok.pad_token_id, pad_to_multiple_of=None)(
        [Example(p.ids + r, [-100] * len(p.ids) + r) for p, r in zip(prompts, resps)])
    for ref in (teacher, TeacherReference(teacher)):
        got = batch_stats(model, batch, ref)
        for i, (p, r) in enumerate(zip(prompts, resps)):
            assert float(got["nll"][i]) / len(r) == pytest.approx(_slow_nll(model, p.ids, r), rel=1e-4)
            assert float(got["kl"][i]) / len(r) == pytest.approx(_slow_kl(model, teacher, p.ids, r), rel=1e-3)


def _metaspace_tokenizer():
    """A SentencePiece-style (Llama-2 / Mistral-v0.1) tokenizer: Metaspace pre-tokenizer that prepends "▁" to the
    text, so a response tokenised on its own starts with "▁the" where, after its prompt, it starts with "the"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(SENTENCES * 5, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>")


def test_teacher_forced_scores_the_tokens_training_trains_on():
    """The reference is tokenised together with its prompt, as in training (mtakd.data.tokenize): with a Metaspace
    tokenizer the response alone would be other tokens ("▁the" for "the" after the prompt's newline)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mtakd.data import DataStats, tokenize

    tok = _metaspace_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=False)).eval()
    records = [Record("Write a short poem.", "", out, f"m:{i}") for i, out in enumerate(["the sea and the sky", "ok"])]
    trained = [tokenize(r, tok, template="alpaca", system_prompt=None, max_prompt_length=256, max_length=512,
                        stats=DataStats()) for r in records]
    alone = tok(records[0].output, add_special_tokens=False)["input_ids"]
    assert alone != [t for t in trained[0].labels if t != -100][:len(alone)]  # the tokenizer shows the difference
    for cap in (None, 3):
        m = evaluate_model(model, tok, {"s": records}, metrics=["nll"], template="alpaca", progress=False,
                           max_response_length=cap)
        for i, e in enumerate(trained):
            n_prompt = e.labels.count(-100)
            resp = e.input_ids[n_prompt:][:cap]
            assert m["per_prompt"]["s"]["tokens"][i] == len(resp)
            assert m["per_prompt"]["s"]["nll"][i] == pytest.approx(_slow_nll(model, e.input_ids[:n_prompt], resp),
                                                                    rel=1e-4)
