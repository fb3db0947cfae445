"""Offline distillation (`mtakd cache-teacher` + `teacher.cache`): a full-vocabulary float32 cache reproduces the
online run (every logged component, eval losses, final weights) without loading the teacher; a cache built for
other data or another layer map is refused with the mismatch named; an interrupted build resumes; DDP processes
read their own batches' entries; the top-k buckets of the divergences."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mtakd.cli import main
from mtakd.objectives.base import CachedLogProbs
from tests.conftest import EXAMPLES, REPO, needs_spacy, run_subcommand, write_tiny_run_config

COMPONENTS = ("loss", "grad_norm", "learning_rate", "loss_base", "loss_ce", "loss_kd", "loss_dsa", "loss_hid")
EVAL = ("eval_loss", "eval_loss_base", "eval_loss_ce", "eval_loss_kd", "eval_loss_dsa", "eval_loss_hid")


# ----------------------------------------------------------------------------------- top-k buckets
def _random_logp(n, v, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * scale, -1)


def test_topk_buckets_give_the_symmetric_uniform_kl_and_the_full_divergence_at_k_equal_v():
    from mtakd.objectives.base import topk_buckets
    from mtakd.objectives.gjsd import kl

    s, t = _random_logp(6, 50, 0), _random_logp(6, 50, 1)
    t_k, ids = t.topk(8, -1)
    sb, tb = topk_buckets(s, t_k, ids, CachedLogProbs.top_k(t, 8).rest)
    assert sb.shape == tb.shape == (6, 9)
    torch.testing.assert_close(sb.exp().sum(-1), torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(tb.exp().sum(-1), torch.ones(6, dtype=torch.float64))
    # the form of DistillKit's sparse KL with missing_probability_handling=symmetric_uniform (without its clamp of
    # the missing masses at 1e-6, which these tails do not reach): the top-k terms plus the tail term
    # p_rest·log(p_rest / q_rest), with the student's full log-probabilities at the ids
    p_rest, q_rest = 1 - t_k.exp().sum(-1), 1 - s.gather(-1, ids).exp().sum(-1)
    assert bool((p_rest > 1e-6).all() and (q_rest > 1e-6).all())
    want = (t_k.exp() * (t_k - s.gather(-1, ids))).sum(-1) + p_rest * (p_rest / q_rest).log()
    torch.testing.assert_close(kl(tb, sb), want)
    # k = V: the bucket is empty and every divergence is the full-vocabulary one
    t_all, ids_all = t.topk(50, -1)
    s = s.clone().requires_grad_()
    sb, tb = topk_buckets(s, t_all, ids_all, CachedLogProbs.top_k(t, 50).rest)
    torch.testing.assert_close(kl(tb, sb), kl(t, s))
    kl(tb, sb).sum().backward()  # the empty buckets (every id masked) give finite gradients
    assert bool(torch.isfinite(s.grad).all())


def _pair_with_tails(v, top_t, tail_t, top_s, tail_s, seed=0):
    """Teacher and student logits ``[1, 3, V]`` (float32, as the models return them) whose next-token distributions
    at every position put ``top_*`` (scaled to ``1 − tail_*``) on tokens 0..k−1 and ``tail_*`` on the other V − k,
    spread with the same random proportions on both sides (each below the k-th probability). The student's
    conditional distribution inside the bucket is then the teacher's, so a divergence on the (k+1) buckets equals
    the full-vocabulary one: the full vocabulary in float64 is the exact reference."""
    g = torch.Generator().manual_seed(seed)
    shape = torch.rand(v - len(top_t), generator=g, dtype=torch.float64) + 0.5
    shape = shape / shape.sum()

    def logits(top, tail):
        top = torch.tensor(top, dtype=torch.float64)
        p = torch.cat([top / top.sum() * (1 - tail), shape * tail])
        assert p[len(top):].max() < p[:len(top)].min()
        return p.log().float().expand(1, 3, v).contiguous()

    return logits(top_s, tail_s), logits(top_t, tail_t)


def _cached_topk(t_logits, k):
    """The cache's entries for the response positions of ``t_logits`` (built as `mtakd cache-teacher` does)."""
    return CachedLogProbs.top_k(t_logits[0, :2].float().log_softmax(-1), k)


LABELS = torch.tensor([[-100, 7, 8]])  # two response positions (0 and 1), with the same distributions


def _full_reference(base, s_logits, t_logits, **cfg):
    """The divergence on the full vocabulary, in float64 (value, gradient in the student's logits) at one position."""
    from mtakd.config import ObjectiveConfig
    from mtakd.objectives import build_objective

    z = s_logits[0, :1].double().requires_grad_()
    d = build_objective(ObjectiveConfig(base=base, **cfg)).divergence(z.log_softmax(-1),
                                                                      t_logits[0, :1].double().log_softmax(-1)).sum()
    d.backward()
    return float(d.detach()), z.grad[0]


def _topk_loss(base, s_logits, cache, chunk_size=0, **cfg):
    from mtakd.config import ObjectiveConfig
    from mtakd.objectives import build_objective

    z = s_logits.clone().requires_grad_()
    loss = build_objective(ObjectiveConfig(base=base, chunk_size=chunk_size, **cfg)).kd_loss(z, cache, LABELS)
    loss.backward()
    return float(loss.detach()), z.grad[0, :2].sum(0).double()  # the mean's gradient, summed over the 2 positions


@pytest.mark.parametrize("chunk_size", [0, 1])
def test_a_confident_students_tail_is_resolved_in_log_space(chunk_size):
    """Issue 24, item 2: the student's bucket 1 − Σ top-k floors at ~6e-8 in float32; teacher tail 1e-3, student
    tail 1e-9 gave FKL 0.00873 against 0.01282 exact and a 60× too weak tail gradient."""
    s, t = _pair_with_tails(1000, [0.4, 0.3, 0.2, 0.1], 1e-3, [0.4, 0.3, 0.2, 0.1], 1e-9)
    want, want_grad = _full_reference("fkl", s, t)
    assert want == pytest.approx(0.01282, abs=1e-5)
    got, grad = _topk_loss("fkl", s, _cached_topk(t, 4), chunk_size)
    assert got == pytest.approx(want, rel=1e-4)
    # the gradient in the tail tokens' logits (what pulls the student's tail up to the teacher's)
    assert grad[4:].sum() == pytest.approx(float(want_grad[4:].sum()), rel=1e-3)
    torch.testing.assert_close(grad, want_grad, rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("base", ["rkl", "akl", "fkl", "srkl", "js"])
@pytest.mark.parametrize("chunk_size", [0, 1])
def test_a_confident_teachers_tail_is_stored_in_log_space(base, chunk_size):
    """Issue 24, item 1: the teacher's bucket recomputed as 1 − exp(logsumexp(top-k)) from float32 values floors at
    ~6e-8 (log −87.3 after the floor); teacher tail 1e-9, student tail 0.077 gave rkl 7.10 against 1.96 exact. The
    cache stores the teacher's leftover log-mass computed from its full log-softmax."""
    s, t = _pair_with_tails(1000, [0.4, 0.3, 0.2, 0.1], 1e-9, [0.1, 0.2, 0.3, 0.4], 0.077)
    want, want_grad = _full_reference(base, s, t)
    got, grad = _topk_loss(base, s, _cached_topk(t, 4), chunk_size)
    assert got == pytest.approx(want, rel=1e-4)
    torch.testing.assert_close(grad, want_grad, rtol=1e-3, atol=1e-7)


def test_the_cache_build_stores_the_teachers_leftover_log_mass_from_its_full_log_softmax():
    """A confident teacher (tiny Llama, large LM head weights): the stored ``rest`` is log Σ_{v ∉ top-k} p(v) of the
    teacher's own logits, to float32 rounding in log space, far below 1 − Σ top-k's resolution."""
    from mtakd.objectives.base import _upcast
    from mtakd.teacher_cache import _teacher_entries
    from tests.conftest import tiny_llama

    teacher = tiny_llama(64, layers=1, hidden=16)
    with torch.no_grad():
        teacher.lm_head.weight.normal_(0, 6, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, 4:] = ids[:, 4:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    entries = _teacher_entries(teacher, batch, [], None, 4, torch.float32, torch.device("cpu"), _upcast)
    with torch.no_grad():
        logp = teacher(input_ids=ids).logits[:, :-1][labels[:, 1:].ne(-100)].double().log_softmax(-1)
    top = logp.topk(4, -1).indices
    assert torch.equal(entries["ids"].long(), top)
    want = logp.scatter(-1, top, -torch.inf).logsumexp(-1)
    assert entries["rest"].shape == want.shape == (10,) and entries["rest"].dtype == torch.float32
    assert (want < -25).sum() >= 3  # tails far below float32's 1 − Σ resolution (~6e-8, log −16.6)
    torch.testing.assert_close(entries["rest"].double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("chunk_size", [0, 1])
def test_akl_ranks_the_tail_bucket_below_every_top_k_token(chunk_size):
    """Issue 24, item 10: every token in the bucket has at most the k-th token's probability, so the bucket ranks
    last in AKL's head/tail split whatever its total mass, and is tail once Σ top-k ≥ μ. Here the teacher's bucket
    (0.4) outweighs each top-k token and Σ top-4 = 0.6 ≥ μ = 0.5: ranked by mass it took the head."""
    s, t = _pair_with_tails(1000, [0.3, 0.12, 0.1, 0.08], 0.4, [0.1, 0.2, 0.05, 0.15], 0.5)
    want, want_grad = _full_reference("akl", s, t, akl_mu=0.5)
    got, grad = _topk_loss("akl", s, _cached_topk(t, 4), chunk_size, akl_mu=0.5)
    assert got == pytest.approx(want, rel=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-8)


def test_a_format_1_cache_is_refused_with_the_rebuild_command(tmp_path):
    """Format 1 top-k caches lack the teacher's leftover log-mass: refused, naming the command that rebuilds."""
    from mtakd.config import ConfigError
    from mtakd.teacher_cache import TeacherCache

    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "complete": True, "top_k": 64}))
    with pytest.raises(ConfigError, match=r"format 1, this mtakd reads format 2 only; rebuild it with "
                                          r"`mtakd cache-teacher --config CFG --out .* --overwrite`"):
        TeacherCache(tmp_path)


@pytest.mark.parametrize("base", ["fkl", "rkl", "skl", "srkl", "js", "gjsd", "tvd", "akl", "distillm"])
def test_every_registered_divergence_runs_on_a_topk_cache(base):
    """Each token divergence takes the (k+1)-bucket distributions: finite, ≥ 0, 0 when the student is the teacher,
    and it trains the student (a gradient reaches the logits outside the top-k too, through the bucket)."""
    from mtakd.config import ObjectiveConfig
    from mtakd.objectives import build_objective
    from mtakd.objectives.base import CachedLogProbs

    obj = build_objective(ObjectiveConfig(base=base))
    labels = torch.tensor([[-100, 5, 6, 7, -100], [-100, -100, 3, 4, 9]])
    n = int(labels[:, 1:].ne(-100).sum())
    logits = torch.randn(2, 5, 40, dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(2, 5, 40, dtype=torch.float64) * 2
    t_logp = torch.log_softmax(t_logits[:, :-1][labels[:, 1:].ne(-100)], -1)
    cache = CachedLogProbs.top_k(t_logp, 6)
    ids = cache.ids
    loss = obj.kd_loss(logits, cache, labels)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    outside = torch.ones(n, 40, dtype=torch.bool).scatter(-1, ids, False)
    assert logits.grad[:, :-1][labels[:, 1:].ne(-100)][outside].abs().sum() > 0
    # the student equal to the teacher: zero (to rounding)
    same = obj.kd_loss(t_logits, cache, labels)
    assert abs(float(same)) < 1e-10
    # a full-vocabulary cache is the online loss
    full = obj.kd_loss(logits.detach(), CachedLogProbs(t_logp, None), labels)
    torch.testing.assert_close(full, obj.kd_loss(logits.detach(), t_logits, labels))


def test_bases_that_need_more_of_the_teacher_refuse_a_cache():
    from mtakd.config import ObjectiveConfig
    from mtakd.objectives import OBJECTIVES, build_objective

    use = {name: build_objective(ObjectiveConfig(base=name)).teacher_cache_use() for name in OBJECTIVES}
    assert use["fdd"] == "none"
    assert use["distillm2"] == "full"  # fixed pairs: the teacher's signals on both sequences are cached
    assert use["distillm"] == "partial"  # student-generated outputs: the teacher scores those batches
    assert build_objective(ObjectiveConfig(base="distillm", options={"student_generation": False})
                           ).teacher_cache_use() == "full"
    assert all(use[n] == "full" for n in ("fkl", "rkl", "skl", "srkl", "js", "gjsd", "tvd", "akl", "sft"))


def _distillm2_parts(s, t, labels, chunk_size=0):
    """DistiLLM-2's logged parts (``loss``, ``skl``, ``srkl``) and the gradient in the student's side ``s`` (logits, or a
    HiddenHead of a leaf hidden state) against the teacher's side ``t`` (logits or CachedLogProbs)."""
    from types import SimpleNamespace

    from mtakd.config import ObjectiveConfig
    from mtakd.objectives import build_objective
    from mtakd.objectives.base import HiddenHead

    obj = build_objective(ObjectiveConfig(base="distillm2", kd_ratio=0.5, chunk_size=chunk_size))
    leaf = (s.hidden if isinstance(s, HiddenHead) else s).detach().requires_grad_()
    s = HiddenHead(leaf, s.head) if isinstance(s, HiddenHead) else leaf
    parts = obj(SimpleNamespace(logits=s), SimpleNamespace(logits=t), {"labels": labels})
    parts["loss"].backward()
    return {k: float(parts[k]) for k in ("loss", "skl", "srkl")}, leaf.grad


@pytest.mark.parametrize("chunk_size", [0, 3])
@pytest.mark.parametrize("hidden_head", [False, True])
def test_distillm2_from_a_cache_is_the_online_loss_and_runs_on_topk_buckets(chunk_size, hidden_head):
    """Rows 0–1: teacher responses (SKL), rows 2–3: student responses (SRKL). A full-vocabulary cache of the response
    positions gives the online loss and gradients (unchunked, chunked, with the student's LM head fused); a top-k cache
    gives both divergences on the same k+1 buckets: finite, the full ones at k = V, and gradients outside the top-k."""
    from mtakd.objectives.base import HiddenHead

    if hidden_head and chunk_size == 0:
        pytest.skip("a HiddenHead student is always chunked")
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([[-100, 5, 6, 7, -100], [-100, -100, 3, 4, 9], [-100, 8, 2, -100, -100],
                           [-100, -100, 1, 1, 3]])
    mask = labels[:, 1:].ne(-100)
    head = torch.nn.Linear(16, 40, bias=False, dtype=torch.float64)
    hidden = torch.randn(4, 5, 16, generator=g, dtype=torch.float64)
    s = HiddenHead(hidden, head) if hidden_head else head(hidden).detach()
    t_logits = torch.randn(4, 5, 40, generator=g, dtype=torch.float64) * 2
    t_logp = torch.log_softmax(t_logits[:, :-1][mask], -1)
    online, grad = _distillm2_parts(s, t_logits, labels, chunk_size)
    full, full_grad = _distillm2_parts(s, CachedLogProbs(t_logp, None), labels, chunk_size)
    assert full == pytest.approx(online, rel=1e-10)
    torch.testing.assert_close(full_grad, grad)
    every, _ = _distillm2_parts(s, CachedLogProbs.top_k(t_logp, 40), labels, chunk_size)
    assert every == pytest.approx(online, rel=1e-8)
    top, top_grad = _distillm2_parts(s, CachedLogProbs.top_k(t_logp, 6), labels, chunk_size)
    assert all(math.isfinite(v) and v > 0 for v in top.values())
    assert top_grad.abs().sum() > 0
    if not hidden_head:  # the bucket's gradient reaches the logits outside the teacher's top-k
        outside = torch.ones_like(t_logp, dtype=torch.bool).scatter(-1, t_logp.topk(6, -1).indices, False)
        assert top_grad[:, :-1][mask][outside].abs().sum() > 0


# ------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_teacher_dir, tiny_narrow_student_dir):
    root = tmp_path_factory.mktemp("teacher_cache")

    def config(name, train=EXAMPLES / "demo.jsonl", data=None, training=None, **sections):
        return write_tiny_run_config(
            root / f"{name}.yaml", tiny_teacher_dir, tiny_narrow_student_dir, train, root / name, root / "spans",
            data={"max_samples": 20, "validation_size": 4, **(data or {})},
            training={"eval_steps": 2, **(training or {})}, **sections)

    return root, config


@pytest.fixture(scope="module")
def exact_cache(tiny):
    root, config = tiny
    cfg = config("exact")
    assert main(["cache-teacher", "--config", str(cfg), "--out", str(root / "cache"), "--top-k", "0",
                 "--dtype", "float32", "--shard-size", "6"]) == 0
    return cfg, root / "cache"


def _logs(run):
    return json.loads((run / "log_history.json").read_text())


@needs_spacy
def test_cached_run_equals_the_online_run_and_never_loads_the_teacher(tiny, exact_cache, monkeypatch,
                                                                     tiny_narrow_student_dir):
    import mtakd.models

    root, _ = tiny
    cfg, cache = exact_cache
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] and manifest["examples"] == {"train": 20, "validation": 4}
    assert manifest["layers"]["teacher_layers"] == [2, 4] and manifest["top_k"] == 0
    assert len(list(cache.glob("train-*.safetensors"))) == 4  # 20 examples in shards of 6
    assert main(["distill", "--config", str(cfg)]) == 0
    online = root / "exact"

    loaded = []
    real_load = mtakd.models.load_model
    monkeypatch.setattr(mtakd.models, "load_model", lambda src: loaded.append(src.describe()) or real_load(src))
    assert main(["distill", "--config", str(cfg), f"teacher.cache={cache}",
                 f"training.output_dir={root / 'exact-cached'}"]) == 0
    cached = root / "exact-cached"
    assert loaded == [str(tiny_narrow_student_dir)]  # the student only: the teacher's weights stay on disk

    a, b = _logs(online), _logs(cached)
    train_a, train_b = [h for h in a if "loss" in h], [h for h in b if "loss" in h]
    assert [h["step"] for h in train_a] == [h["step"] for h in train_b] == [1, 2, 3]
    for x, y in zip(train_a, train_b):
        for k in COMPONENTS:
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-5), (k, x["step"], x[k], y[k])
    eval_a, eval_b = [h for h in a if "eval_loss" in h], [h for h in b if "eval_loss" in h]
    assert len(eval_a) == len(eval_b) >= 1  # the validation split is read from the cache too
    for x, y in zip(eval_a, eval_b):
        for k in EVAL:
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-5), (k, x["epoch"])
    for name in ("student/model.safetensors", "mta_projectors.safetensors"):
        ta, tb = load_file(online / name), load_file(cached / name)
        assert set(ta) == set(tb)
        for k in ta:
            torch.testing.assert_close(tb[k], ta[k], rtol=0, atol=1e-6, msg=f"{name}:{k}")
    info = json.loads((cached / "mtakd_run.json").read_text())
    assert info["teacher_cache"]["top_k"] == 0


@needs_spacy
def test_a_cache_for_other_data_or_layers_is_refused_naming_the_mismatch(tiny, exact_cache, capsys):
    root, config = tiny
    cfg, cache = exact_cache
    code = main(["distill", "--config", str(cfg), f"teacher.cache={cache}", "data.max_length=40",
                 "objective.mta.key_layers=[{student: 1, teacher: 3, granularity: word}]",
                 f"training.output_dir={root / 'refused'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "does not match this run" in err and "data.max_length: cache 48, run 40" in err
    assert "need teacher layers [3], the cache holds [2, 4]" in err
    assert not (root / "refused" / "log_history.json").exists()
    other = root / "other.jsonl"
    other.write_text((EXAMPLES / "demo.jsonl").read_text().replace("a", "A", 1))
    code = main(["distill", "--config", str(cfg), f"teacher.cache={cache}", f"data.train=[{other}]",
                 f"training.output_dir={root / 'refused2'}"])
    assert code == 2 and "data.train: cache [{\"sha256\"" in capsys.readouterr().err
    # a base that needs more of the teacher than the cache holds
    code = main(["distill", "--config", str(cfg), f"teacher.cache={cache}", "objective.base=fdd",
                 f"training.output_dir={root / 'refused3'}"])
    assert code == 2 and "base objective 'fdd' cannot be trained from a teacher cache" in capsys.readouterr().err


@needs_spacy
def test_distillm_generated_batches_run_the_loaded_teacher_and_dataset_batches_read_the_cache(
        tiny, exact_cache, monkeypatch, tiny_teacher_dir):
    """DistiLLM's student-generated outputs do not exist before training: the teacher is loaded and scores those
    batches; the dataset batches of the same run read the cache."""
    import mtakd.teacher_cache as tc
    from mtakd.trainer import DistillTrainer

    root, _ = tiny
    cfg, cache = exact_cache
    sources, online = [], []
    real_fetch, real_online = tc.TeacherCache.fetch, DistillTrainer._teacher_outputs
    monkeypatch.setattr(tc.TeacherCache, "fetch", lambda self, *a: sources.append("cache") or real_fetch(self, *a))

    def spy(self, fwd, inputs, cache_index, cache_split, need_hidden):
        if cache_index is None and self.model.training:
            online.append(self.teacher is not None)
        return real_online(self, fwd, inputs, cache_index, cache_split, need_hidden)

    monkeypatch.setattr(DistillTrainer, "_teacher_outputs", spy)
    assert main(["distill", "--config", str(cfg), f"teacher.cache={cache}", "objective.base=distillm",
                 "objective.options={init_threshold: 0.5, max_new_tokens: 8}", "training.max_steps=4",
                 f"training.output_dir={root / 'sgo'}"]) == 0
    sgo = [h["loss_sgo"] for h in _logs(root / "sgo") if "loss" in h]
    assert 0.0 in sgo and 1.0 in sgo  # both kinds of step happened
    gen_s = [h["loss_generation_s"] for h in _logs(root / "sgo") if "loss" in h]  # the sampling time is logged
    assert all(g == 0 for s, g in zip(sgo, gen_s) if s == 0) and any(g > 0 for g in gen_s)
    assert online == [True] * int(sum(sgo))  # generated batches: the loaded teacher
    assert len(sources) >= sgo.count(0.0)  # dataset batches (and evaluations): the cache


def _pairs(root, name="pairs.jsonl", n=12, short=False):
    """demo.jsonl's first ``n`` records with a student response (``short``: a one-word one)."""
    rows = [json.loads(l) for l in (EXAMPLES / "demo.jsonl").read_text().splitlines()[:n]]
    path = root / name
    path.write_text("".join(json.dumps({**r, "student_output": "Yes." if short else " ".join(r["output"].split()[::-1])})
                            + "\n" for r in rows))
    return path


@needs_spacy
def test_distillm2_with_mta_trains_from_a_cache_of_both_sequences_of_each_pair(tiny, monkeypatch,
                                                                             tiny_narrow_student_dir):
    """A pair's teacher-response and student-response sequences are cache entries 2i and 2i + 1; the cached run (the
    teacher never loaded; also with the LM heads fused into the chunked loss, and without MTA) logs what the online run
    logs, MTA on the teacher-response rows included; a top-k cache trains with finite losses; a pair dataset whose
    student responses changed is refused by check_examples."""
    import mtakd.models
    from mtakd.config import load_config
    from mtakd.models import load_tokenizer
    from mtakd.objectives.distillm2 import DistiLLM2
    from mtakd.run import build_datasets
    from mtakd.teacher_cache import CacheMismatch, TeacherCache

    root, config = tiny
    cfg = config("d2", train=_pairs(root), data={"max_samples": 12},
                 objective={"base": "distillm2", "kd_ratio": 0.5},
                 training={"per_device_train_batch_size": 2})
    cache = root / "d2-cache"
    assert main(["cache-teacher", "--config", str(cfg), "--out", str(cache), "--top-k", "0", "--dtype", "float32",
                 "--shard-size", "5"]) == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["examples"] == {"train": 16, "validation": 8} and manifest["sequences_per_example"] == 2
    # MTA's states are stored for the teacher-response (even) entries only (shards of 5 split pairs: shard 1
    # starts with entry 5, the student response of pair 2)
    assert manifest["mta_sequences_per_example"] == 1
    from safetensors import safe_open
    for shard in sorted(cache.glob("train-*.safetensors")):
        first = 5 * int(shard.stem.split("-")[1])
        with safe_open(str(shard), framework="pt") as fh:
            lengths = fh.get_tensor("lengths")
            teacher_rows = lengths[(torch.arange(first, first + len(lengths)) % 2) == 0].sum()
            layers = [n for n in fh.keys() if n.startswith(("hidden.", "importance."))]
            assert layers and all(fh.get_slice(n).get_shape()[0] == teacher_rows for n in layers)
    no_mta = ["objective.mta.enabled=false"]
    for name, extra in (("d2", []), ("d2-no-mta", no_mta)):  # online
        assert main(["distill", "--config", str(cfg), *extra, f"training.output_dir={root / name}"]) == 0
    loaded = []
    real_load = mtakd.models.load_model
    monkeypatch.setattr(mtakd.models, "load_model", lambda src: loaded.append(src.describe()) or real_load(src))
    for online, name, extra in (("d2", "d2-cached", []), ("d2", "d2-fused", ["objective.chunk_size=8"]),
                                ("d2-no-mta", "d2-no-mta-cached", no_mta)):
        assert main(["distill", "--config", str(cfg), f"teacher.cache={cache}", *extra,
                     f"training.output_dir={root / name}"]) == 0
        a, b = _logs(root / online), _logs(root / name)
        assert [h["step"] for h in a if "loss" in h] == [h["step"] for h in b if "loss" in h] == [1, 2, 3]
        assert len([h for h in a if "eval_loss" in h]) >= 1  # the validation pairs are read from the cache too
        assert [sorted(h) for h in a] == [sorted(h) for h in b]
        for x, y in zip(a, b):
            for k in (k for k in x if k.startswith(("loss", "eval_loss")) or k == "grad_norm"):
                assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-5), (name, k, x["step"], x[k], y[k])
    assert loaded == [str(tiny_narrow_student_dir)] * 3  # the students only: the teacher's weights stay on disk
    # a cache holding the states of every entry (as built before mta_sequences) is read alike, and is larger
    with monkeypatch.context() as m:
        m.setattr(DistiLLM2, "mta_sequences", None)
        assert main(["cache-teacher", "--config", str(cfg), "--out", str(root / "d2-all"), "--top-k", "0", "--dtype",
                     "float32", "--shard-size", "5"]) == 0
    assert "mta_sequences_per_example" not in json.loads((root / "d2-all" / "manifest.json").read_text())
    assert main(["distill", "--config", str(cfg), f"teacher.cache={root / 'd2-all'}",
                 f"training.output_dir={root / 'd2-all-run'}"]) == 0
    strip = lambda run: [{k: v for k, v in h.items() if "runtime" not in k and "per_second" not in k}  # noqa: E731
                         for h in _logs(run)]
    assert strip(root / "d2-all-run") == strip(root / "d2-cached")
    size = lambda d: sum(p.stat().st_size for p in d.glob("*.safetensors"))  # noqa: E731
    assert size(root / "d2-all") > size(cache)
    # a top-k cache: both divergences on the k+1 buckets, finite; MTA's first step as online
    assert main(["cache-teacher", "--config", str(cfg), "--out", str(root / "d2-top8"), "--top-k", "8",
                 "--dtype", "float32"]) == 0
    assert main(["distill", "--config", str(cfg), f"teacher.cache={root / 'd2-top8'}",
                 f"training.output_dir={root / 'd2-top8-run'}"]) == 0
    first, top = _logs(root / "d2")[0], [h for h in _logs(root / "d2-top8-run") if "loss" in h]
    assert all(math.isfinite(h[k]) and h[k] > 0 for h in top for k in ("loss_skl", "loss_srkl", "grad_norm"))
    for k in ("loss_dsa", "loss_hid"):
        assert top[0][k] == pytest.approx(first[k], rel=1e-5)

    run = load_config(str(cfg), [f"data.train=[{_pairs(root, 'changed.jsonl', short=True)}]"])
    train, _, _ = build_datasets(run, load_tokenizer(run.teacher), progress=False)
    with pytest.raises(CacheMismatch, match="the student-response sequence of train example 0 has 48 tokens"):
        TeacherCache(cache).check_examples("train", train)
    with pytest.raises(CacheMismatch, match="holds 2 sequence\\(s\\) per example, this run's train examples hold 1"):
        TeacherCache(cache).check_examples("train", build_datasets(
            load_config(str(cfg), ["objective.base=skl"]), load_tokenizer(run.teacher), progress=False)[0])


def test_an_interrupted_build_keeps_its_shards_and_resumes(tiny, monkeypatch):
    import mtakd.teacher_cache as tc

    root, config = tiny
    cfg = config("resume", data={"validation_size": None}, objective={"base": "skl", "mta": {"enabled": False}})
    out = root / "resume-cache"
    real_save, saved = tc._save_atomic, []

    def crash_on_third(tensors, path):
        if len(saved) == 2:
            raise KeyboardInterrupt
        saved.append(path.name)
        real_save(tensors, path)

    monkeypatch.setattr(tc, "_save_atomic", crash_on_third)
    argv = ["cache-teacher", "--config", str(cfg), "--out", str(out), "--top-k", "5", "--shard-size", "4"]
    with pytest.raises(KeyboardInterrupt):
        run_subcommand(tc, argv)
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    assert sorted(kept) == saved == ["train-00000.safetensors", "train-00001.safetensors"]
    monkeypatch.setattr(tc, "_save_atomic", lambda tensors, path: saved.append(path.name) or real_save(tensors, path))
    assert run_subcommand(tc, argv) == 0
    assert saved[2:] == ["train-00002.safetensors", "train-00003.safetensors", "train-00004.safetensors"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors") if p.name in kept} == kept
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["top_k"] == 5 and manifest["layers"]["teacher_layers"] == []
    shard = load_file(out / "train-00000.safetensors")
    assert shard["ids"].shape[-1] == shard["logp"].shape[-1] == 5 and shard["lengths"].shape == (4,)
    assert shard["rest"].shape == shard["ids"].shape[:1] and bool((shard["rest"] < 0).all())  # log leftover mass
    # ... and the trainer's batches read it back with their rows (example 1 of the first shard)
    n_tok, n_resp = int(shard["lengths"][1]), int(shard["n_response"][1])
    labels = torch.tensor([[-100] * (n_tok - n_resp) + [1] * n_resp])
    got = tc.TeacherCache(out).fetch("train", torch.tensor([1]), torch.ones(1, n_tok, dtype=torch.long), labels).logits
    first = int(shard["n_response"][0])
    torch.testing.assert_close(got.rest, shard["rest"][first:first + n_resp], rtol=0, atol=0)
    torch.testing.assert_close(got.ids, shard["ids"][first:first + n_resp].long(), rtol=0, atol=0)
    # another --top-k into the same directory is refused
    with pytest.raises(FileExistsError, match="other settings"):
        run_subcommand(tc, ["cache-teacher", "--config", str(cfg), "--out", str(out), "--top-k", "7",
                            "--shard-size", "4"])


# ---------------------------------------------------------------------------------------------- DDP
@needs_spacy
def test_two_cpu_processes_read_their_own_entries(tmp_path, tiny_teacher_dir, tiny_narrow_student_dir,
                                                  equal_length_jsonl):
    """2 processes × 2 sequences from the cache = 1 process × 4 sequences from the cache (equal-length data, as
    in test_distributed.py): a rank reading another rank's entries would fail the row-length check or change
    the loss."""
    from tests.test_distributed import _assert_same_run, _free_port

    def config(name, **training):
        return write_tiny_run_config(tmp_path / f"{name}.yaml", tiny_teacher_dir, tiny_narrow_student_dir,
                                     equal_length_jsonl, tmp_path / name, tmp_path / "spans", training=training)

    cache = tmp_path / "cache"
    assert main(["cache-teacher", "--config", str(config("single")), "--out", str(cache), "--top-k", "0",
                 "--dtype", "float32"]) == 0
    assert main(["distill", "--config", str(config("single")), f"teacher.cache={cache}"]) == 0
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "mtakd.cli", "distill",
           "--config", str(config("ddp", per_device_train_batch_size=2)), f"teacher.cache={cache}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _assert_same_run(tmp_path / "ddp", tmp_path / "single")


# ------------------------------------------------------------------------------------- stale teacher
def _same_size_rewrite(f):
    """Other bytes in ``f``, same size and same mtime (what size + mtime cannot tell apart)."""
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[-8:] = bytes(255 - b for b in data[-8:])
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns


def test_a_cache_whose_local_teacher_was_rewritten_is_refused_without_loading_it(tmp_path, tiny_teacher_dir,
                                                                                  tiny_narrow_student_dir, capsys):
    """Issue 24, item 3: re-running a teacher SFT into the same directory kept the old cache valid (the weights'
    fingerprint was checked only when a student built from the teacher loaded them). The files on disk are
    fingerprinted at build and at use; the student here is not built from the teacher."""
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    cfg = write_tiny_run_config(tmp_path / "run.yaml", teacher, tiny_narrow_student_dir, EXAMPLES / "demo.jsonl",
                                tmp_path / "run", tmp_path / "spans", data={"max_samples": 8},
                                objective={"base": "fkl", "mta": {"enabled": False}}, training={"max_steps": 1})
    cache = tmp_path / "cache"
    assert main(["cache-teacher", "--config", str(cfg), "--out", str(cache), "--top-k", "4"]) == 0
    assert set(json.loads((cache / "manifest.json").read_text())["teacher"]["on_disk"]["files"]) == {
        "config.json", "model.safetensors"}
    _same_size_rewrite(teacher / "model.safetensors")
    code = main(["distill", "--config", str(cfg), f"teacher.cache={cache}"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "the teacher on disk is not the one the cache was built from (model.safetensors changed)" in err
    assert "rebuild it with `mtakd cache-teacher`" in err
    assert not (tmp_path / "run" / "log_history.json").exists()


def test_a_random_init_teachers_cache_records_its_seed(tmp_path, tiny_teacher_dir, tiny_narrow_student_dir, capsys):
    """A random_init teacher is its configuration and the seed: another training.seed is another teacher."""
    cfg = write_tiny_run_config(tmp_path / "run.yaml", tiny_teacher_dir, tiny_narrow_student_dir,
                                EXAMPLES / "demo.jsonl", tmp_path / "run", tmp_path / "spans",
                                teacher={"random_init": True}, data={"max_samples": 8},
                                objective={"base": "fkl", "mta": {"enabled": False}}, training={"max_steps": 1})
    cache = tmp_path / "cache"
    assert main(["cache-teacher", "--config", str(cfg), "--out", str(cache), "--top-k", "4"]) == 0
    on_disk = json.loads((cache / "manifest.json").read_text())["teacher"]["on_disk"]
    assert on_disk["seed"] == 42 and set(on_disk["files"]) == {"config.json"}  # random weights: no weight files
    code = main(["distill", "--config", str(cfg), f"teacher.cache={cache}", "training.seed=7"])
    err = capsys.readouterr().err
    assert code == 2 and "the teacher on disk is not the one the cache was built from (seed: cache 42, run 7)" in err


def test_teacher_fingerprint_of_a_gguf_file_and_of_a_hub_id(tmp_path, monkeypatch):
    """A GGUF teacher: the file's content (a same-size, same-mtime rewrite changes it), without loading it; a hub id:
    the commit the local Hugging Face cache resolves the revision to (a pinned commit as given)."""
    import huggingface_hub.constants

    from mtakd.config import RunConfig
    from mtakd.teacher_cache import _fingerprint_changes, teacher_files_fingerprint

    def run(**teacher):
        return RunConfig.model_validate({"teacher": teacher, "student": {"path": "s"}, "data": {"train": ["x"]}})

    gguf = tmp_path / "teacher.Q4.gguf"
    gguf.write_bytes(os.urandom(4096))
    cfg = run(path=str(tmp_path), gguf_file=gguf.name)
    before = teacher_files_fingerprint(cfg)
    assert set(before) == {"files"} and before["files"]["teacher.Q4.gguf"]["bytes"] == 4096
    _same_size_rewrite(gguf)
    assert _fingerprint_changes(before, teacher_files_fingerprint(cfg)) == ["teacher.Q4.gguf changed"]

    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    repo = hub / "models--org--tiny"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    assert teacher_files_fingerprint(run(path="org/tiny")) == {"hub_commit": "a" * 40}
    (repo / "refs" / "main").write_text("b" * 40)  # a newer main was downloaded (e.g. with the tokenizer)
    assert teacher_files_fingerprint(run(path="org/tiny")) == {"hub_commit": "b" * 40}
    assert teacher_files_fingerprint(run(path="org/tiny", revision="c" * 40)) == {"hub_commit": "c" * 40}
    assert teacher_files_fingerprint(run(path="org/uncached")) == {"hub_commit": None}
