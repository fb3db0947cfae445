"""The dequantised copy of a GGUF checkpoint (``mtakd.models._materialise_gguf``) under concurrency: two
processes loading the same GGUF for the first time at once both get the copy, it is made once, and no temp
directory is left. The GGUF parsing itself is transformers' (stood in for by a tiny model here: what is tested
is the cache directory's life cycle); the processes are real (forked)."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest
import transformers

from mtakd import models
from tests.conftest import tiny_llama


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, tiny_tokenizer):
    """A file standing for a GGUF checkpoint; "loading" it takes a while (so that two processes overlap) and
    appends a line to ``loads.txt``. Returns (directory, file name, loads file)."""
    monkeypatch.setenv("MTAKD_CACHE", str(tmp_path / "cache"))
    (tmp_path / "m.gguf").write_bytes(b"stand-in for a GGUF file")
    loads = tmp_path / "loads.txt"

    def load_model(path, gguf_file=None, dtype=None, **kwargs):
        with open(loads, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(0.5)
        return tiny_llama(len(tiny_tokenizer), layers=1, hidden=16)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", load_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tiny_tokenizer)
    return tmp_path, "m.gguf", loads


def _first_load(path, name, barrier, results):
    barrier.wait()
    try:
        results.put(("ok", str(models._materialise_gguf(str(path), name))))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        results.put(("error", repr(e)))


def _leftovers(cache_dir):
    return sorted(p.name for p in (cache_dir / "gguf").iterdir() if ".tmp" in p.name)


def test_two_processes_loading_a_gguf_for_the_first_time_at_once(fake_gguf):
    """Before: both wrote into the same ``.tmp`` directory and the second ``os.replace`` failed with "Directory
    not empty" (or the temp directory vanished under it)."""
    path, name, loads = fake_gguf
    ctx = multiprocessing.get_context("fork")  # the children inherit the stand-in loaders
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_first_load, args=(path, name, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [status for status, _ in got] == ["ok", "ok"], got
    out = models._gguf_cache_dir(str(path), name)
    assert {where for _, where in got} == {str(out)}
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert len(loads.read_text().split()) == 1  # dequantised once: the other process waited and reused it
    assert _leftovers(path / "cache") == []


def test_a_copy_another_process_renamed_first_counts_as_done(fake_gguf, monkeypatch):
    """Where the lock does not hold (some network file systems), the other process may rename its copy first:
    this one's rename then fails on the non-empty directory, which is success, and its temp directory goes."""
    path, name, _ = fake_gguf
    out = models._gguf_cache_dir(str(path), name)
    real_replace = os.replace

    def other_one_first(src, dst):
        import shutil

        shutil.copytree(src, dst)  # the other process's complete copy
        return real_replace(src, dst)  # OSError: Directory not empty

    monkeypatch.setattr(models.os, "replace", other_one_first)
    assert models._materialise_gguf(str(path), name) == out
    assert (out / "config.json").is_file()
    assert _leftovers(path / "cache") == []
    # a temp directory a killed process left is removed by the next one that makes the copy
    import shutil

    shutil.rmtree(out)
    (out.parent / f"{out.name}.tmp-1-deadbeef").mkdir()
    monkeypatch.setattr(models.os, "replace", real_replace)
    assert models._materialise_gguf(str(path), name) == out
    assert _leftovers(path / "cache") == []
