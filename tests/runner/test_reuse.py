"""The reuse stage against real files and the real S3 server: a quantize run writes its work key;
a second job with the same work reuses its artifacts only after checking them, and falls back
(with the reason) when an input or an artifact changed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from qjob_api.runner import RunnerConfig, RunnerResult
from qjob_api.v1alpha1 import JobReference, QuantizationJobSpec
from qjob_api.work import recipe_key, recipe_of, work_key
from qjob_dev.tiny_models import pydoc_paragraphs, write_jsonl
from qjob_runner import run
from qjob_runner.storage import ObjectStore

from .helpers import location, runner_config

SPEC = QuantizationJobSpec.model_validate(
    {
        "model": {"pvc": {"claimName": "models", "path": "tiny"}},
        "quantization": {"format": "fp8"},
        "calibration": {"dataset": {"pvc": {"claimName": "data"}}, "samples": 16, "sequenceLength": 64},
        "evaluation": {"samples": 8},
        "output": {"pvc": {"claimName": "artifacts"}},
    }
)
RECIPE = recipe_of(SPEC).to_api()


def job_config(job: str, model: Path, data: Path, out: Path, uri: str, **fields) -> RunnerConfig:
    """The RunnerConfig of one of this file's jobs: the quantize stage unless ``fields`` say otherwise."""
    return RunnerConfig.model_validate(
        runner_config(
            job=job,
            model={"path": str(model)},
            calibration={"dataset": {"path": str(data)}},
            outputDir=str(out),
            outputUri=uri,
            workRecipe=RECIPE,
            **fields,
        )
    )


def quantize_config(model: Path, data: Path, out: Path, uri: str) -> RunnerConfig:
    return job_config("a", model, data, out, uri)


@pytest.fixture(scope="module")
def job_a(tiny_llama, calib_jsonl, tmp_path_factory) -> tuple[Path, RunnerResult]:
    out = tmp_path_factory.mktemp("artifacts") / "ml" / "a"
    result = run(quantize_config(tiny_llama, calib_jsonl, out, "pvc://artifacts/ml/a"))
    assert result.outcome == "Succeeded", result.message
    return out, result


def candidate(result: RunnerResult, output_uri: str, **where) -> dict:
    return {
        "job": {"namespace": "ml", "name": "a", "uid": "uid-a"},
        "workKey": work_key(recipe_of(SPEC), result.work),
        "inputs": result.work.to_api(),
        "outputUri": output_uri,
        "artifacts": [
            a.model_copy(update={"uri": a.uri.replace("pvc://artifacts/ml/a", output_uri)}).to_api()
            for a in result.artifacts
        ],
        **where,
    }


def reuse_config(model: Path, data: Path, out: Path, uri: str, candidates: list[dict], **extra) -> RunnerConfig:
    return job_config("b", model, data, out, uri, stage="reuse", **{"reuse": {"candidates": candidates}, **extra})


@pytest.fixture
def copy_of_a(job_a, tmp_path) -> Path:
    """A's output where this test may damage it."""
    return Path(shutil.copytree(job_a[0], tmp_path / "artifacts" / "ml" / "a"))


def test_quantize_records_its_work_key_in_the_manifest_and_result(job_a, tiny_llama, calib_jsonl):
    out, result = job_a
    manifest = json.loads((out / "manifest.json").read_text())
    assert result.work.model_revision.startswith("files:")
    assert result.work.calibration_data.startswith("sha256:")
    assert "nvidia-modelopt" in result.work.versions and "python" not in result.work.versions
    assert manifest["work"] == {
        "key": work_key(recipe_of(SPEC), result.work),
        "recipeKey": recipe_key(recipe_of(SPEC)),
        "inputs": result.work.to_api(),
    }


def test_same_work_is_reused_after_checking_every_file(job_a, tiny_llama, calib_jsonl, tmp_path):
    out_a, result_a = job_a
    out_b = tmp_path / "artifacts" / "ml" / "b"
    cfg = reuse_config(
        tiny_llama,
        calib_jsonl,
        out_b,
        "pvc://artifacts/ml/b",
        [candidate(result_a, "pvc://artifacts/ml/a", outputDir=str(out_a))],
    )
    result = run(cfg)
    assert result.outcome == "Succeeded", result.message
    assert result.reuse.reason == "Reused" and result.reuse.reused_from == JobReference(
        namespace="ml", name="a", uid="uid-a"
    )
    assert result.work == result_a.work  # the same inputs, resolved again without the GPU stage
    before = {a.uri.replace("/ml/a/", "/ml/b/"): a.sha256 for a in result_a.artifacts}
    assert {a.uri: a.sha256 for a in result.artifacts} == before
    assert result.quality == result_a.quality
    manifest = json.loads((out_b / "manifest.json").read_text())
    assert manifest["job"] == "b" and manifest["reusedFrom"]["name"] == "a"
    assert manifest["work"]["key"] == work_key(recipe_of(SPEC), result_a.work)
    a_manifest = json.loads((out_a / "manifest.json").read_text())
    for entry in a_manifest["artifacts"]:
        for f in entry["files"]:
            mine = out_b / entry["path"] / f["path"]
            assert mine.stat().st_size == f["size"]
            assert os.path.samefile(mine, out_a / entry["path"] / f["path"])  # linked, not copied
    assert not list(out_b.parent.glob(".b.staging-*"))


def test_a_changed_file_is_not_reused_and_nothing_is_published(job_a, copy_of_a, tiny_llama, calib_jsonl, tmp_path):
    _, result_a = job_a
    shard = next(copy_of_a.glob("hf/*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte different
    shard.write_bytes(bytes(data))
    out_b = tmp_path / "artifacts" / "ml" / "b"
    cand = candidate(result_a, "pvc://artifacts/ml/a", outputDir=str(copy_of_a))
    result = run(reuse_config(tiny_llama, calib_jsonl, out_b, "pvc://artifacts/ml/b", [cand]))
    assert result.outcome == "Succeeded" and result.reuse.reused_from is None
    assert result.reuse.reason == "ReuseArtifactChanged" and shard.name in result.reuse.message
    assert not result.artifacts and not (out_b / "manifest.json").exists()


def test_a_missing_manifest_is_not_reused(job_a, copy_of_a, tiny_llama, calib_jsonl, tmp_path):
    (copy_of_a / "manifest.json").unlink()
    cand = candidate(job_a[1], "pvc://artifacts/ml/a", outputDir=str(copy_of_a))
    result = run(reuse_config(tiny_llama, calib_jsonl, tmp_path / "b", "pvc://artifacts/ml/b", [cand]))
    assert result.reuse.reason == "ReuseArtifactMissing" and "manifest.json" in result.reuse.message


def test_other_calibration_texts_are_other_work(job_a, tiny_llama, tmp_path):
    other = write_jsonl(tmp_path / "other.jsonl", list(reversed(pydoc_paragraphs()[:400])))
    cand = candidate(job_a[1], "pvc://artifacts/ml/a", outputDir=str(job_a[0]))
    result = run(reuse_config(tiny_llama, other, tmp_path / "b", "pvc://artifacts/ml/b", [cand]))
    assert result.reuse.reason == "ReuseInputsChanged"
    assert "calibration texts differ" in result.reuse.message and "model revision" not in result.reuse.message
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_other_model_weights_are_other_work(job_a, tiny_llama, calib_jsonl, tmp_path):
    model = Path(shutil.copytree(tiny_llama, tmp_path / "model"))
    (model / "generation_config.json").write_text('{"temperature": 0.5}')
    cand = candidate(job_a[1], "pvc://artifacts/ml/a", outputDir=str(job_a[0]))
    result = run(reuse_config(model, calib_jsonl, tmp_path / "b", "pvc://artifacts/ml/b", [cand]))
    assert result.reuse.reason == "ReuseInputsChanged" and "model revision files:" in result.reuse.message


def test_s3_candidate_checked_and_copied_to_an_s3_output(
    job_a, s3_server, s3_bucket, s3_creds, tiny_llama, calib_jsonl, tmp_path, monkeypatch
):
    out_a, result_a = job_a
    monkeypatch.setenv("QJOB_S3_REUSE0_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("QJOB_S3_REUSE0_SECRET_ACCESS_KEY", s3_server.secret_key)
    old = location(s3_server, s3_bucket, role="reuse0", prefix="ml/a", credentials_env="QJOB_S3_REUSE0")
    published = shutil.copytree(out_a, tmp_path / "published", ignore=shutil.ignore_patterns(".qjob-work", "result*"))
    ObjectStore(old).upload_folder(published, "ml/a")  # A's output as the runner's uploader leaves it
    uri_a = f"s3://{s3_bucket}/ml/a"
    cand = candidate(result_a, uri_a, outputS3=old.model_dump())
    out_s3 = location(s3_server, s3_bucket, prefix="ml/b")
    cfg = reuse_config(
        tiny_llama,
        calib_jsonl,
        tmp_path / "scratch",
        f"s3://{s3_bucket}/ml/b",
        [cand],
        outputS3=out_s3.model_dump(),
        workDir=str(tmp_path / "work"),
    )
    result = run(cfg)
    assert result.reuse.reason == "Reused", result.reuse.message
    keys = s3_server.keys(s3_bucket, "ml/b/")
    a_keys = s3_server.keys(s3_bucket, "ml/a/")
    assert {k.replace("ml/b/", "ml/a/") for k in keys} == set(a_keys)
    for key, meta in keys.items():
        if not key.endswith("manifest.json"):
            assert meta["Size"] == a_keys[key.replace("ml/b/", "ml/a/")]["Size"]
    manifest = json.loads(s3_server.client().get_object(Bucket=s3_bucket, Key="ml/b/manifest.json")["Body"].read())
    assert manifest["reusedFrom"]["uri"] == uri_a
    assert {a.uri for a in result.artifacts} == {
        a.uri.replace("pvc://artifacts/ml/a", f"s3://{s3_bucket}/ml/b") for a in result_a.artifacts
    }

    # An object of A deleted: C falls back, its prefix gets no manifest.
    victim = next(k for k in a_keys if k.endswith(".safetensors"))
    s3_server.client().delete_object(Bucket=s3_bucket, Key=victim)
    again = run(
        cfg.model_copy(
            update={
                "job": "c",
                "output_s3": out_s3.model_copy(update={"prefix": "ml/c"}),
                "output_uri": f"s3://{s3_bucket}/ml/c",
            }
        )
    )
    assert again.reuse.reason == "ReuseArtifactMissing" and "gone" in again.reuse.message
    assert "ml/c/manifest.json" not in s3_server.keys(s3_bucket, "ml/c/")


def add_engine(out: Path, uri: str, arch: str = "hopper") -> list[dict]:
    """An engine folder as a build stage leaves it (its own manifest, registered like build.py's);
    returns the status artifacts a build stage would have reported for it."""
    from qjob_runner.artifacts import describe

    folder = out / "engines" / arch
    folder.mkdir(parents=True)
    (folder / "rank0.engine").write_bytes(os.urandom(64 * 1024))
    (folder / "build_info.json").write_text(json.dumps({"engine": "tensorrt_llm", "architecture": arch}))
    size, digest, files = describe(folder)
    entry = {"name": "tensorrt_llm", "path": f"engines/{arch}", "kind": "engine", "format": "tensorrt_llm",
             "sizeBytes": size, "sha256": digest, "files": files, "architecture": arch}  # fmt: skip
    manifest = {"job": "a", "stage": f"build-{arch}", "artifacts": [entry],
                "effectiveConfig": {"runner": {"engine": {"architecture": arch}}}}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return [
        {"kind": "engine", "format": "tensorrt_llm", "uri": f"{uri}/engines/{arch}", "architecture": arch,
         "computeCapability": "9.0", "tensorrtVersion": "10.13", "sizeBytes": size, "sha256": digest},
        {"kind": "manifest", "format": "json", "uri": f"{uri}/engines/{arch}/manifest.json"},
    ]  # fmt: skip


def test_engines_are_reused_one_by_one_by_target(job_a, copy_of_a, tiny_llama, calib_jsonl, tmp_path):
    _, result_a = job_a
    cand = candidate(result_a, "pvc://artifacts/ml/a", outputDir=str(copy_of_a))
    cand["artifacts"] += add_engine(copy_of_a, "pvc://artifacts/ml/a")

    same = tmp_path / "same"
    result = run(
        reuse_config(tiny_llama, calib_jsonl, same, "pvc://artifacts/ml/same", [cand],
                     reuse={"candidates": [cand], "engines": [{"architecture": "hopper"}, {"architecture": "ada"}]})
    )  # fmt: skip
    assert result.reuse.reason == "Reused" and [e.value for e in result.reuse.engines] == ["hopper"]
    assert "engines to build: ada" in result.reuse.message
    engine = next(a for a in result.artifacts if a.kind == "engine")
    assert engine.uri == "pvc://artifacts/ml/same/engines/hopper" and engine.tensorrt_version == "10.13"
    assert (same / "engines" / "hopper" / "rank0.engine").read_bytes() == (
        copy_of_a / "engines" / "hopper" / "rank0.engine"
    ).read_bytes()
    assert json.loads((same / "engines" / "hopper" / "manifest.json").read_text())["reusedFrom"]["name"] == "a"

    # Another target for the same architecture: the checkpoint is reused, the engine is built again.
    other = tmp_path / "other"
    result = run(
        reuse_config(tiny_llama, calib_jsonl, other, "pvc://artifacts/ml/other", [cand],
                     reuse={"candidates": [cand], "engines": [{"architecture": "hopper", "maxBatchSize": 64}]})
    )  # fmt: skip
    assert result.reuse.reason == "Reused" and result.reuse.engines == []
    assert "engines to build: hopper" in result.reuse.message
    assert not (other / "engines").exists() and (other / "manifest.json").exists()
    assert all(a.kind != "engine" for a in result.artifacts)

    # A damaged engine that is wanted is a changed artifact: nothing is reused.
    (copy_of_a / "engines" / "hopper" / "rank0.engine").write_bytes(os.urandom(64 * 1024))
    result = run(
        reuse_config(tiny_llama, calib_jsonl, tmp_path / "late", "pvc://artifacts/ml/late", [cand],
                     reuse={"candidates": [cand], "engines": [{"architecture": "hopper"}]})
    )  # fmt: skip
    assert result.reuse.reason == "ReuseArtifactChanged" and "rank0.engine" in result.reuse.message


def test_a_model_this_stage_may_not_read_is_not_reused_and_the_job_runs(
    job_a, s3_server, s3_bucket, tiny_llama, calib_jsonl, tmp_path, monkeypatch
):
    """A job whose model only the shared cache's fill Job may read (the platform's registry, no
    credential of the job's): the reuse stage cannot resolve its revision, and says so instead of
    failing a job that its stages would run."""
    monkeypatch.setenv("QJOB_S3_MODEL_ACCESS_KEY_ID", "not-the-platforms")
    monkeypatch.setenv("QJOB_S3_MODEL_SECRET_ACCESS_KEY", "not-the-platforms")
    registry = location(s3_server, s3_bucket, role="model", prefix="registry/tiny")
    cand = candidate(job_a[1], "pvc://artifacts/ml/a", outputDir=str(job_a[0]))
    cfg = reuse_config(tiny_llama, calib_jsonl, tmp_path / "b", "pvc://artifacts/ml/b", [cand])
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": None, "s3": registry})})
    result = run(cfg)
    assert result.outcome == "Succeeded", result.message
    assert result.reuse.reason == "ReuseInputsUnresolved" and "the job runs" in result.reuse.message
    assert not (tmp_path / "b" / "manifest.json").exists()
