"""The fetch stage against a real S3 server: the model lands in the shared cache once, the GPU
stage reads it from there (downloading nothing), a second job and a retry fetch 0 bytes."""

from __future__ import annotations

import json
import os
import struct
import time

import pytest
from qjob_api.runner import ExitCode, RunnerConfig
from qjob_runner import run
from qjob_runner.errors import InvalidInput, TransientError
from qjob_runner.modelcache import CacheBounds, cache_key, fetch_into_cache, hold, make_room, s3_published_hashes
from qjob_runner.storage import ObjectStore

from .helpers import Recording, location, runner_config


def _config(s3_server, bucket, cache, calib, out, stage):
    return RunnerConfig.model_validate(
        runner_config(
            stage=stage,
            model={
                "s3": location(s3_server, bucket, role="model", prefix="models/tiny").model_dump(),
                "cacheDir": str(cache),
            },
            calibration={"dataset": {"path": str(calib)}},
            outputDir=str(out),
        )
    )


def _fetched(result_file) -> dict:
    return json.loads(result_file.read_text())


def test_fetch_then_quantize_from_the_shared_cache(s3_server, s3_bucket, s3_creds, tiny_llama, calib_jsonl, tmp_path):
    s3_server.upload_folder(tiny_llama, s3_bucket, "models/tiny")
    cache, out = tmp_path / "cache", tmp_path / "out"
    model_bytes = sum(p.stat().st_size for p in tiny_llama.rglob("*") if p.is_file())

    reporter = Recording("fetch")
    fetch = run(_config(s3_server, s3_bucket, cache, calib_jsonl, out, "fetch"), reporter=reporter)
    assert fetch.outcome == "Succeeded", fetch.message
    # The fetch stage reads the fetched safetensors headers (no separate inspect stage): the operator
    # sizes the GPU pods (disk; GPUs when automatic) from the size in its result.
    header_bytes = 8 + struct.unpack("<Q", (tiny_llama / "model.safetensors").read_bytes()[:8])[0]
    assert fetch.model_size.weight_bytes == (tiny_llama / "model.safetensors").stat().st_size - header_bytes
    assert fetch.model_size.layers == json.loads((tiny_llama / "config.json").read_text())["num_hidden_layers"]
    assert _fetched(out / "result-fetch.json")["modelSize"]["weightBytes"] == fetch.model_size.weight_bytes
    progress = [u for u in reporter.updates if u.get("message") and "MiB/s" in u["message"]]
    assert progress and progress[-1]["percent"] == 100 and progress[-1]["eta_seconds"] == 0
    [ref] = (cache / "refs").glob("*.json")
    entry = cache / json.loads(ref.read_text())["entry"]
    assert json.loads(ref.read_text())["bytesFetched"] == model_bytes
    assert (entry / "config.json").exists() and not list(cache.glob("s3/*.partial"))
    assert (out / "result-fetch.json").exists() and not (out / "manifest.json").exists()

    # The GPU stage: its model source is the cache entry; nothing is downloaded.
    quantize = run(_config(s3_server, s3_bucket, cache, calib_jsonl, out, "quantize"))
    assert quantize.outcome == "Succeeded", quantize.message
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["modelBytesFetched"] == 0
    assert manifest["metrics"]["modelCacheEntry"] == entry.relative_to(cache).as_posix()
    assert manifest["effectiveConfig"]["resolvedModelDir"] == str(entry)

    # A second job on the same model, or a retry of the fetch: 0 bytes.
    again = run(_config(s3_server, s3_bucket, cache, calib_jsonl, tmp_path / "out2", "fetch"))
    assert again.outcome == "Succeeded" and json.loads(ref.read_text())["bytesFetched"] == 0


def test_gpu_stage_without_a_fetched_entry_fails_clearly(s3_server, s3_bucket, s3_creds, calib_jsonl, tmp_path):
    result = run(_config(s3_server, s3_bucket, tmp_path / "empty-cache", calib_jsonl, tmp_path / "out", "quantize"))
    assert result.exit_code == ExitCode.INVALID_INPUT and result.failed_step == "resolve"
    assert "no record of this job's model" in result.message and "Fix:" in result.message


def test_missing_model_prefix_fails_the_fetch_with_the_field(s3_server, s3_bucket, s3_creds, calib_jsonl, tmp_path):
    result = run(_config(s3_server, s3_bucket, tmp_path / "cache", calib_jsonl, tmp_path / "out", "fetch"))
    assert result.exit_code == ExitCode.INVALID_INPUT and result.failed_step == "fetch"
    assert "spec.model.s3.bucket and spec.model.s3.prefix" in result.message


def _entry(root, name: str, size: int, age: float):
    entry = root / "s3" / name
    entry.mkdir(parents=True)
    (entry / "model.safetensors").write_bytes(b"\0" * size)
    (root / "s3" / f"{name}.use").touch()
    then = time.time() - age
    os.utime(entry, (then, then))
    return entry


def test_eviction_frees_least_recently_used_entries_no_stage_reads(tmp_path):
    root, kib, hour = tmp_path / "cache", 1024, 3600
    old, in_use, recent = (
        _entry(root, n, 40 * kib, age) for n, age in (("old", 3 * hour), ("used", 2 * hour), ("new", 60))
    )
    reading = hold(in_use)  # a running stage reads it
    notes = []
    try:
        bounds = CacheBounds(max_bytes=130 * kib, keep_seconds=hour)
        assert make_room(root, 10 * kib, bounds, lambda m, f, e: notes.append(m)) == []  # 120 + 10 fits in 130
        assert make_room(root, 40 * kib, bounds, lambda m, f, e: notes.append(m)) == ["s3/old"]
        assert not old.exists() and in_use.exists() and recent.exists() and "evicted 1" in notes[-1]
        # What is left is in use or recent: the cache is full for now (retried), not bad input.
        with pytest.raises(TransientError, match="model cache is full"):
            make_room(root, 60 * kib, bounds, lambda *a: None)
    finally:
        reading.close()
    # Once the stage is done, the older of the rest goes.
    assert make_room(root, 60 * kib, CacheBounds(max_bytes=130 * kib, keep_seconds=hour), lambda *a: None) == [
        "s3/used"
    ]
    with pytest.raises(InvalidInput, match="holds at most"):  # larger than the whole cache: fix the size
        make_room(root, 200 * kib, CacheBounds(max_bytes=130 * kib), lambda *a: None)


def test_fetch_evicts_to_stay_under_the_bound(s3_server, s3_bucket, s3_creds, tmp_path):
    for name in ("a", "b"):
        src = tmp_path / name
        src.mkdir()
        (src / "model.safetensors").write_bytes(os.urandom(3 << 20))
        s3_server.upload_folder(src, s3_bucket, f"models/{name}")
    root = tmp_path / "cache"
    bounds = CacheBounds(max_bytes=5 << 20, keep_seconds=0)  # room for one model
    first, _ = fetch_into_cache(
        ObjectStore(location(s3_server, s3_bucket, "model", prefix="models/a")), root / "s3", lambda *a: None, bounds
    )
    second, fetched = fetch_into_cache(
        ObjectStore(location(s3_server, s3_bucket, "model", prefix="models/b")), root / "s3", lambda *a: None, bounds
    )
    assert fetched == 3 << 20 and second.is_dir() and not first.exists()


def test_s3_downloads_are_checked_against_the_stores_checksums(s3_server, s3_bucket, s3_creds, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_bytes(b'{"model_type": "llama"}')
    (src / "model.safetensors").write_bytes(os.urandom(2 << 20))
    s3_server.upload_folder(src, s3_bucket, "m")  # single-part: full-object CRC32 and an MD5 ETag
    store = ObjectStore(location(s3_server, s3_bucket, "model", prefix="m"))
    published = s3_published_hashes(store, store.list("m"))
    assert {name: alg for name, (alg, _, _) in published.items()} == {
        "config.json": "crc32",
        "model.safetensors": "crc32",
    }
    # A same-sized but damaged file left by an earlier attempt is caught, removed, and fetched again.
    root = tmp_path / "cache" / "s3"
    partial = root / f"{cache_key(store.location, store.list('m'))}.partial"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"\0" * (2 << 20))
    with pytest.raises(TransientError, match="model.safetensors does not match the crc32"):
        fetch_into_cache(store, root, lambda *a: None)
    assert not (partial / "model.safetensors").exists()
    entry, fetched = fetch_into_cache(store, root, lambda *a: None)
    assert fetched == 2 << 20 and (entry / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
