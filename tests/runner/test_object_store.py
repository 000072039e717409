"""Object-store input and output against a real S3 server (versitygw on loopback, tests/s3_fixtures.py)."""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from qjob_api.runner import ExitCode, RunnerConfig
from qjob_dev.s3server import S3Server, free_port
from qjob_runner import run
from qjob_runner.errors import InvalidConfig, InvalidInput, TransientError
from qjob_runner.modelcache import cache_key, fetch_into_cache
from qjob_runner.storage import MiB, ObjectStore, TransferSettings

from .helpers import location, runner_config

SMALL_PARTS = TransferSettings(part_size=5 * MiB, concurrency=4)  # S3's smallest part: multipart on small files


def artifact_folder(root: Path) -> Path:
    (root / "hf").mkdir(parents=True)
    (root / "hf" / "model.safetensors").write_bytes(os.urandom(12 * MiB + 17))  # three parts
    (root / "hf" / "config.json").write_text('{"a": 1}')
    (root / "manifest.json").write_text('{"complete": true}')
    return root


def test_upload_multipart_manifest_last(s3_server, s3_bucket, s3_creds, tmp_path):
    folder = artifact_folder(tmp_path / "stage")
    order: list[str] = []
    store = ObjectStore(location(s3_server, s3_bucket), SMALL_PARTS)
    # Watch the server side: record the keys present each time bytes move.
    sent = store.upload_folder(
        folder, "ns/job", progress=lambda done, total: order.append(",".join(sorted(s3_server.keys(s3_bucket))))
    )
    objects = s3_server.keys(s3_bucket)
    assert set(objects) == {"ns/job/hf/model.safetensors", "ns/job/hf/config.json", "ns/job/manifest.json"}
    assert sent == sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert objects["ns/job/hf/model.safetensors"]["ETag"].strip('"').endswith("-3")  # 3 multipart parts
    body = s3_server.client().get_object(Bucket=s3_bucket, Key="ns/job/hf/model.safetensors")["Body"].read()
    assert body == (folder / "hf" / "model.safetensors").read_bytes()
    # Until the last bytes moved, the manifest was never there.
    assert order and all("manifest.json" not in seen for seen in order[:-1])


def test_failed_reupload_leaves_no_complete_looking_output(tmp_path, s3_creds, monkeypatch):
    """A second attempt that dies mid-upload (the store goes away) leaves no manifest behind."""
    server = S3Server(tmp_path / "s3").start()
    try:
        server.client().create_bucket(Bucket="outputs")
        monkeypatch.setenv("QJOB_S3_OUTPUT_ACCESS_KEY_ID", server.access_key)
        monkeypatch.setenv("QJOB_S3_OUTPUT_SECRET_ACCESS_KEY", server.secret_key)
        folder = artifact_folder(tmp_path / "stage")
        ObjectStore(location(server, "outputs"), SMALL_PARTS).upload_folder(folder, "ns/job")
        assert "ns/job/manifest.json" in server.keys("outputs")

        def outage(done, total):
            server.stop()

        with pytest.raises(TransientError) as err:
            ObjectStore(location(server, "outputs"), SMALL_PARTS).upload_folder(folder, "ns/job", progress=outage)
        assert "spec.output.s3.endpoint" in str(err.value) and "Fix:" in str(err.value)
        server.start()
        assert "ns/job/manifest.json" not in server.keys("outputs")
    finally:
        server.stop()


def test_missing_bucket_is_permanent_and_names_the_field(s3_server, s3_creds):
    with pytest.raises(InvalidInput) as err:
        ObjectStore(location(s3_server, "no-such-bucket")).check_writable("ns/job")
    assert "no-such-bucket" in str(err.value) and "spec.output.s3.bucket" in str(err.value)


def test_wrong_credentials_are_permanent_and_name_the_secret(s3_server, s3_bucket, s3_creds, monkeypatch):
    monkeypatch.setenv("QJOB_S3_OUTPUT_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(InvalidInput) as err:
        ObjectStore(location(s3_server, s3_bucket)).check_writable("ns/job")
    assert "refused the credentials" in str(err.value)
    assert "spec.output.s3.credentialsSecretRef" in str(err.value)


def test_missing_credentials_env_is_a_config_error(s3_server, s3_bucket, monkeypatch):
    monkeypatch.delenv("QJOB_S3_OUTPUT_ACCESS_KEY_ID", raising=False)
    with pytest.raises(InvalidConfig) as err:
        ObjectStore(location(s3_server, s3_bucket)).check_writable("ns/job")
    assert "accessKeyId" in str(err.value)


def test_unreachable_endpoint_is_transient_after_retries(s3_bucket, s3_creds):
    closed = free_port()
    started = time.monotonic()
    with pytest.raises(TransientError) as err:
        ObjectStore(
            location(None, s3_bucket, endpoint=f"http://127.0.0.1:{closed}", region="us-east-1")
        ).check_writable("x")
    assert "spec.output.s3.endpoint" in str(err.value) and f"127.0.0.1:{closed}" in str(err.value)
    assert time.monotonic() - started < 30


def test_model_from_s3_to_s3_output_through_the_pipeline(
    s3_server, s3_bucket, s3_creds, tiny_llama, calib_jsonl, tmp_path
):
    """The runner quantizes a model it downloads from S3 and uploads the artifacts to S3."""
    s3_server.upload_folder(tiny_llama, s3_bucket, "models/tiny")
    cache = tmp_path / "model-cache"
    os.environ["QJOB_MODEL_CACHE"] = str(cache)
    try:
        model_s3 = location(s3_server, s3_bucket, role="model", prefix="models/tiny").model_dump()
        out_s3 = location(s3_server, s3_bucket).model_dump()
        cfg = RunnerConfig.model_validate(
            runner_config(
                model={"s3": model_s3},
                calibration={"dataset": {"path": str(calib_jsonl)}},
                outputDir=str(tmp_path / "scratch"),
                outputUri=f"s3://{s3_bucket}/ns/job",
                outputS3=out_s3,
            )
        )
        result = run(cfg)
        assert result.outcome == "Succeeded", result.message
        objects = s3_server.keys(s3_bucket, "ns/job/")
        assert "ns/job/manifest.json" in objects and any(k.startswith("ns/job/hf/") for k in objects)
        assert not any(".qjob-write-check" in k for k in objects)
        uris = {a.uri for a in result.artifacts}
        assert f"s3://{s3_bucket}/ns/job/hf" in uris and f"s3://{s3_bucket}/ns/job/manifest.json" in uris
        manifest = json.loads(
            s3_server.client().get_object(Bucket=s3_bucket, Key="ns/job/manifest.json")["Body"].read()
        )
        hf = next(a for a in manifest["artifacts"] if a["name"] == "hf")
        for f in hf["files"]:  # every file the manifest lists is in the bucket with its size
            assert objects[f"ns/job/hf/{f['path']}"]["Size"] == f["size"]
        assert manifest["metrics"]["modelBytesFetched"] == sum(
            p.stat().st_size for p in tiny_llama.rglob("*") if p.is_file()
        )

        # A second job on the same model fetches nothing: the cache entry is keyed by the objects' ETags.
        again = run(cfg.model_copy(update={"output_dir": str(tmp_path / "scratch2")}))
        assert again.outcome == "Succeeded", again.message
        manifest = json.loads(
            s3_server.client().get_object(Bucket=s3_bucket, Key="ns/job/manifest.json")["Body"].read()
        )
        assert manifest["metrics"]["modelBytesFetched"] == 0
    finally:
        del os.environ["QJOB_MODEL_CACHE"]


def test_output_bucket_checked_before_any_model_work(s3_server, s3_creds, tiny_llama, calib_jsonl, tmp_path):
    cfg = RunnerConfig.model_validate(
        runner_config(
            model={"path": str(tiny_llama)},
            calibration={"dataset": {"path": str(calib_jsonl)}},
            outputDir=str(tmp_path / "scratch"),
            outputS3=location(s3_server, "missing-bucket").model_dump(),
        )
    )
    result = run(cfg)
    assert result.exit_code == ExitCode.INVALID_INPUT and result.failed_step == "resolve"
    assert "spec.output.s3.bucket" in result.message and "load" not in result.step_seconds


def test_model_cache_download_once_resume_and_etag_key(s3_server, s3_bucket, s3_creds, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(MiB))
    (src / "sub").mkdir()
    (src / "sub" / "b.bin").write_bytes(os.urandom(6 * MiB))
    s3_server.upload_folder(src, s3_bucket, "m")
    store = ObjectStore(location(s3_server, s3_bucket, role="model", prefix="m"), SMALL_PARTS)
    root = tmp_path / "cache"
    messages: list[str] = []

    def note(message, fraction, eta):
        messages.append(message)

    # An interrupted download kept a.bin: resuming fetches only sub/b.bin.
    key = cache_key(store.location, store.list("m"))
    (root / f"{key}.partial").mkdir(parents=True)
    shutil.copy(src / "a.bin", root / f"{key}.partial" / "a.bin")
    # Two jobs at once: one downloads, the other waits on the lock and reuses the entry.
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: fetch_into_cache(store, root, note), range(2)))
    assert sorted(fetched for _, fetched in results) == [0, 6 * MiB]
    entry = results[0][0]
    assert entry == results[1][0] and entry.name == key
    assert (entry / "sub" / "b.bin").read_bytes() == (src / "sub" / "b.bin").read_bytes()
    assert any("MiB/s" in m for m in messages) and any("found in the cache" in m for m in messages)
    # Changed content under the same names is a new entry.
    s3_server.client().put_object(Bucket=s3_bucket, Key="m/a.bin", Body=b"changed")
    changed, fetched = fetch_into_cache(store, root, note)
    assert changed != entry and fetched == 6 * MiB + len(b"changed")


def test_build_stage_reads_the_quantize_output_from_s3(s3_server, s3_bucket, s3_creds, tmp_path):
    """A build stage's local output_dir is empty scratch: preflight brings the finished quantize
    stage's artifacts from the bucket (not engines/, not results) to where the build step reads them."""
    quantized = tmp_path / "quantized"
    (quantized / "onnx").mkdir(parents=True)
    (quantized / "onnx" / "model.onnx").write_bytes(b"onnx bytes")
    (quantized / "engines" / "ada").mkdir(parents=True)
    (quantized / "engines" / "ada" / "model.plan").write_bytes(b"another stage's engine")
    (quantized / "manifest.json").write_text('{"complete": true}')
    ObjectStore(location(s3_server, s3_bucket)).upload_folder(quantized, "ns/job")
    scratch = tmp_path / "scratch"
    cfg = RunnerConfig.model_validate(
        runner_config(
            stage="build-hopper",
            model={"path": "/unused", "task": "encoder"},
            calibration={"dataset": {"path": "/unused"}},
            export={"formats": ["onnx"]},
            engine={"architecture": "hopper"},
            outputDir=str(scratch),
            outputS3=location(s3_server, s3_bucket).model_dump(),
        )
    )
    result = run(cfg)
    # This machine has no GPU: the build step itself fails (retryable), after preflight succeeded.
    assert result.failed_step == "build" and result.exit_code == ExitCode.TRANSIENT, result.message
    assert (scratch / "onnx" / "model.onnx").read_bytes() == b"onnx bytes"
    assert (scratch / "manifest.json").exists() and not (scratch / "engines" / "ada").exists()
    assert not any(k.startswith("ns/job/engines/hopper") for k in s3_server.keys(s3_bucket))
