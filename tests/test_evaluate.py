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


def test_evaluate_model_in_process(tiny):
    model, tok, _ = tiny
    model.train()
    m = evaluate_model(model, tok, {"a": _records(3)}, seeds=[1, 2], max_new_tokens=6, batch_size=2,
                       max_prompt_length=4, progress=False)
    assert model.training  # restored
    assert tok.padding_side == "right"  # not modified
    s = m["sets"]["a"]
    assert s["n"] == 3 and set(s["per_seed"]) == {"1", "2"} and s["prompts_truncated"] == 3
    assert len(m["per_prompt"]["a"]) == 3
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
    assert metrics["sets"]["alpha"]["n"] == 5 and len(metrics["per_prompt"]["beta"]) == 2
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


def test_missing_reference_in_process(tiny):
    model, tok, _ = tiny
    recs = _records(2) + [Record("Q", "", "", "mine.jsonl:7")]
    with pytest.raises(DataError, match=r"mine\.jsonl:7"):
        evaluate_model(model, tok, {"x": recs}, seeds=[1], max_new_tokens=2, progress=False)
