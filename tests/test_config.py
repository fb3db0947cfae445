"""Config loading, overrides, validation messages, and the MTA layer trajectory."""

import json

import pytest

from mtakd.config import ConfigError, MTAConfig, apply_overrides, build_config, load_config
from mtakd.mta.layers import PRESETS, phi, resolve_key_layers

BASE = {
    "teacher": {"path": "some/teacher"},
    "student": {"from_teacher": {"num_layers": 2}},
    "data": {"train": ["x.jsonl"]},
}


def test_overrides_are_yaml_values_and_create_sections():
    d = apply_overrides({"a": {"b": 1}}, ["a.b=2", "a.c=[1, 2]", "x.y.z=true", "s=hello", "f=1e-4"])
    assert d == {"a": {"b": 2, "c": [1, 2]}, "x": {"y": {"z": True}}, "s": "hello", "f": 1e-4}
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"a": 3}, ["a.b=1"])


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError) as e:
        build_config({**BASE, "training": {"learnin_rate": 1e-4}})
    assert "training.learnin_rate" in str(e.value) and "unknown key" in str(e.value)


def test_bad_value_names_key_value_and_allowed():
    with pytest.raises(ConfigError) as e:
        build_config({**BASE, "objective": {"base": "nope"}})
    msg = str(e.value)
    assert "objective.base" in msg and "nope" in msg and "skl" in msg and "fkl" in msg
    with pytest.raises(ConfigError) as e:
        build_config({**BASE, "objective": {"base": "skl", "mta": {"distance": "l1"}}})
    assert "objective.mta.distance" in str(e.value) and "cosine" in str(e.value) and "l1" in str(e.value)
    with pytest.raises(ConfigError, match="training.learning_rate"):
        build_config({**BASE, "training": {"learning_rate": "fast"}})


def test_student_source_rules():
    with pytest.raises(ConfigError, match="exactly one of"):
        build_config({**BASE, "student": {"from_teacher": {}}})
    with pytest.raises(ConfigError, match="not both"):
        build_config({**BASE, "student": {"path": "p", "from_teacher": {"num_layers": 2}}})
    with pytest.raises(ConfigError, match="increasing"):
        build_config({**BASE, "student": {"from_teacher": {"layers": [3, 1]}}})


def test_model_paths_starting_with_a_tilde_are_in_the_home_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = build_config({"teacher": {"path": "~/models/t", "gguf_file": "~/g/t.gguf"}, "student": {"path": "org/~s"},
                        "data": {"train": ["x.jsonl"]}})
    assert cfg.teacher.path == str(tmp_path / "models" / "t") and cfg.teacher.gguf_file == str(tmp_path / "g" / "t.gguf")
    assert cfg.student.path == "org/~s"  # a hub id is left alone


def test_load_config_file_and_relative_data(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("teacher: {path: t}\nstudent: {from_teacher: {num_layers: 1}}\ndata: {train: d.jsonl}\n")
    cfg = load_config(cfg_file, ["training.max_steps=3", "objective.mta.lambda_dsa=1.5"])
    assert cfg.data.train == [str(tmp_path / "d.jsonl")]
    assert cfg.training.max_steps == 3 and cfg.objective.mta.lambda_dsa == 1.5 and cfg.objective.mta_enabled
    cfg_file.write_text("teacher: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(cfg_file)


def test_training_arguments_mapping(tmp_path):
    cfg = build_config({**BASE, "training": {"output_dir": str(tmp_path), "learning_rate": 3e-4, "warmup_steps": 0.1,
                                             "extra_args": {"optim": "adamw_torch"}}})
    args = cfg.training.to_training_arguments()
    assert args.learning_rate == 3e-4 and args.warmup_steps == 0.1 and args.optim == "adamw_torch"
    assert args.remove_unused_columns is False
    bad = build_config({**BASE, "training": {"extra_args": {"no_such_arg": 1}}})
    with pytest.raises(ConfigError, match="no_such_arg"):
        bad.training.to_training_arguments()


# --------------------------------------------------------------------------------- layer trajectory
def test_phi_matches_spec_examples():
    assert phi(6, 12, 48) == 24 and phi(16, 24, 32) == 21 and phi(22, 24, 32) == 29 and phi(14, 24, 24) == 14


@pytest.mark.parametrize(
    "name,m,stride,word", [("gpt2", 3, 3, 1), ("qwen1.5", 6, 2, 1), ("opt", 5, 2, 1)]
)
def test_automatic_striding_reproduces_the_papers_maps(name, m, stride, word):
    n_s, n_t = PRESETS[name]["n"]
    auto = resolve_key_layers(MTAConfig(num_key_layers=m, stride=stride, num_word_layers=word), n_s, n_t)
    assert auto == PRESETS[name]["layers"]
    assert resolve_key_layers(MTAConfig(preset=name), n_s, n_t) == PRESETS[name]["layers"]


def test_paper_table_verbatim():
    table = {
        "gpt2": "S6>T24 | S9>T36 S12>T48",
        "qwen1.5": "S14>T14 | S16>T16 S18>T18 S20>T20 S22>T22 S24>T24",
        "opt": "S16>T21 | S18>T24 S20>T26 S22>T29 S24>T32",
    }
    for name, row in table.items():
        word, phrase = row.split(" | ")
        got = PRESETS[name]["layers"]
        assert " ".join(f"S{k.student}>T{k.teacher}" for k in got if k.granularity == "word") == word
        assert " ".join(f"S{k.student}>T{k.teacher}" for k in got if k.granularity == "phrase") == phrase


def test_ablation_switches_and_errors():
    all_word = resolve_key_layers(MTAConfig(num_key_layers=3, stride=3, num_word_layers=3), 12, 48)
    assert {k.granularity for k in all_word} == {"word"}
    all_phrase = resolve_key_layers(MTAConfig(num_key_layers=3, stride=3, num_word_layers=0), 12, 48)
    assert {k.granularity for k in all_phrase} == {"phrase"}
    assert resolve_key_layers(MTAConfig(num_key_layers=0), 12, 48) == []
    two_one = resolve_key_layers(MTAConfig(num_key_layers=3, stride=3, num_word_layers=2), 12, 48)
    assert [k.granularity for k in two_one] == ["word", "word", "phrase"]
    explicit = resolve_key_layers(MTAConfig(key_layers=[{"student": 4, "granularity": "word"}]), 8, 24)
    assert explicit[0].teacher == 12
    with pytest.raises(ConfigError, match="do not fit"):
        resolve_key_layers(MTAConfig(num_key_layers=5, stride=3), 12, 48)
    with pytest.raises(ConfigError, match="out of range"):
        resolve_key_layers(MTAConfig(key_layers=[{"student": 4, "teacher": 99, "granularity": "word"}]), 8, 24)
    with pytest.raises(ConfigError, match="is for a 12-layer"):
        resolve_key_layers(MTAConfig(preset="gpt2"), 6, 48)
    with pytest.raises(Exception, match="cannot exceed"):
        MTAConfig(num_key_layers=2, num_word_layers=3)


def test_dry_run_prints_resolved_map_without_weights(tmp_path, capsys, tiny_teacher_dir):
    from mtakd.cli import main

    cfg = tmp_path / "c.yaml"
    (tmp_path / "x.jsonl").write_text('{"instruction": "a", "output": "b"}\n')  # --dry-run reads the data files
    cfg.write_text(
        f"teacher: {{path: {tiny_teacher_dir}}}\nstudent: {{from_teacher: {{num_layers: 2}}}}\n"
        "data: {train: x.jsonl}\nobjective: {base: fkl, mta: {num_key_layers: 2, stride: 1}}\n"
    )
    assert main(["distill", "--config", str(cfg), "--dry-run", "training.seed=7"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["training"]["seed"] == 7
    r = out["resolved"]
    assert r["teacher_layers"] == 4 and r["student_selected_from_teacher"] == [1, 4]
    assert r["mta_key_layers"] == [
        {"student": 1, "teacher": 2, "granularity": "word"}, {"student": 2, "teacher": 4, "granularity": "phrase"}
    ]
