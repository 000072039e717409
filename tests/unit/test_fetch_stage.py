"""The fetch stage: plan, Job without GPUs, cache volume modes; the runner's pure cache helpers."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest
from qjob_api.runner import RunnerConfig, RunnerModel, RunnerS3
from qjob_api.v1alpha1 import QuantizationJobSpec
from qjob_operator.builders import QuantizationJobRef, build_job
from qjob_operator.config import OperatorConfig
from qjob_operator.fetch import MODEL_CACHE_ROOT
from qjob_operator.plan import plan_stages
from qjob_runner.errors import TransientError
from qjob_runner.modelcache import published_hashes, request_ref, verify_files

REF = QuantizationJobRef("llama", "ml", "uid-1")


@pytest.fixture
def cached() -> OperatorConfig:
    return OperatorConfig.model_validate({"modelCache": {"claimName": "model-cache"}})


def _jobs(spec_dict, config) -> dict[str, dict]:
    spec = QuantizationJobSpec.model_validate(spec_dict)
    return {s.name: build_job(REF, spec, s, config) for s in plan_stages(spec, config)}


def _pod(job):
    return job["spec"]["template"]["spec"]


def _runner_config(job) -> RunnerConfig:
    env = {e["name"]: e for e in _pod(job)["containers"][0]["env"]}
    return RunnerConfig.model_validate_json(env["QJOB_RUNNER_CONFIG"]["value"])


def test_no_cache_no_fetch_stage(spec_dict, config):
    assert [s.name for s in plan_stages(QuantizationJobSpec.model_validate(spec_dict), config)][0] == "quantize"


def test_fetch_runs_first_without_gpus_and_prefers_cpu_nodes(spec_dict, cached):
    spec = QuantizationJobSpec.model_validate(spec_dict)
    stages = plan_stages(spec, cached)
    assert [(s.name, s.after) for s in stages] == [
        ("fetch", ()),
        ("quantize", ("fetch",)),
        ("build-hopper", ("quantize",)),
    ]
    assert stages[0].requirement.gpus == 0
    jobs = _jobs(spec_dict, cached)
    fetch = _pod(jobs["fetch"])
    resources = fetch["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in resources["requests"] and "nvidia.com/gpu" not in resources["limits"]
    assert (resources["requests"]["cpu"], resources["requests"]["memory"]) == ("1", "4Gi")
    [preferred] = fetch["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred["preference"]["matchExpressions"] == [
        {"key": "nvidia.com/gpu.compute.major", "operator": "DoesNotExist"}
    ]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in fetch["affinity"]["nodeAffinity"]


def test_cache_volume_is_writable_only_for_fetch(spec_dict, cached):
    for name, job in _jobs(spec_dict, cached).items():
        [volume] = [v for v in _pod(job)["volumes"] if v["name"] == "model-cache"]
        [mount] = [m for m in _pod(job)["containers"][0]["volumeMounts"] if m["name"] == "model-cache"]
        assert volume["persistentVolumeClaim"] == {"claimName": "model-cache", "readOnly": name != "fetch"}
        assert mount["readOnly"] is (name != "fetch") and mount["mountPath"] == MODEL_CACHE_ROOT
        assert _runner_config(job).model.cache_dir == MODEL_CACHE_ROOT


def test_the_cache_bound_reaches_the_runner(spec_dict):
    config = OperatorConfig.model_validate({"modelCache": {"claimName": "c", "maxSize": "2Ti", "keepSeconds": 600}})
    model = _runner_config(_jobs(spec_dict, config)["fetch"]).model
    assert (model.cache_max_bytes, model.cache_keep_seconds) == (2 << 40, 600)
    unbounded = _runner_config(
        _jobs(spec_dict, OperatorConfig.model_validate({"modelCache": {"claimName": "c"}}))["fetch"]
    )
    assert unbounded.model.cache_max_bytes is None  # the runner takes 90% of the volume


def test_only_the_fetch_pod_gets_the_model_source_credentials(spec_dict, cached):
    spec_dict["model"] = {"s3": {"bucket": "models", "prefix": "llama", "credentialsSecretRef": {"name": "reader"}}}
    spec_dict["model"]["cacheClaimName"] = "team-cache"  # the spec's claim wins over the operator's
    jobs = _jobs(spec_dict, cached)
    for name, job in jobs.items():
        env = {e["name"] for e in _pod(job)["containers"][0]["env"]}
        assert ("QJOB_S3_MODEL_ACCESS_KEY_ID" in env) is (name == "fetch")
        claims = {v["persistentVolumeClaim"]["claimName"] for v in _pod(job)["volumes"] if "persistentVolumeClaim" in v}
        assert "team-cache" in claims and "model-cache" not in claims


def test_model_on_a_pvc_needs_no_fetch(spec_dict, cached):
    spec_dict["model"] = {"pvc": {"claimName": "models", "path": "llama"}}
    assert "fetch" not in _jobs(spec_dict, cached)


def test_request_ref_separates_sources_and_revisions():
    hf = RunnerModel(hf_repo="org/model", revision="main")
    assert request_ref(hf) == request_ref(RunnerModel(hf_repo="org/model", revision="main"))
    assert request_ref(hf) != request_ref(RunnerModel(hf_repo="org/model", revision="v2"))
    s3 = RunnerModel(s3=RunnerS3(field="spec.model.s3", bucket="models", prefix="llama/"))
    assert request_ref(s3) == request_ref(RunnerModel(s3=RunnerS3(field="x", bucket="models", prefix="llama")))
    assert request_ref(s3) != request_ref(RunnerModel(s3=RunnerS3(field="x", bucket="models", prefix="other")))


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324


def test_files_are_checked_against_the_published_hashes(tmp_path):
    weights, config = b"\x00" * 1000, b'{"model_type": "llama"}'
    (tmp_path / "model.safetensors").write_bytes(weights)
    (tmp_path / "config.json").write_bytes(config)
    siblings = [
        SimpleNamespace(
            rfilename="model.safetensors",
            lfs=SimpleNamespace(sha256=hashlib.sha256(weights).hexdigest(), size=len(weights)),
            blob_id="ignored-for-lfs",
            size=len(weights),
        ),
        SimpleNamespace(rfilename="config.json", lfs=None, blob_id=_git_blob_id(config), size=len(config)),
        SimpleNamespace(rfilename="not-downloaded.bin", lfs=None, blob_id="0" * 40, size=1),
    ]
    published = published_hashes(siblings)
    assert published["model.safetensors"][0] == "sha256" and published["config.json"][0] == "git-sha1"
    assert verify_files(tmp_path, published) == 2
    (tmp_path / "model.safetensors").write_bytes(b"\x01" + weights[1:])  # a damaged download
    with pytest.raises(TransientError, match="does not match the sha256"):
        verify_files(tmp_path, published)
    assert not (tmp_path / "model.safetensors").exists()  # the retry downloads it again


def test_s3_style_digests(tmp_path):
    import base64
    import zlib

    path = tmp_path / "f"
    path.write_bytes(b"hello")
    crc = base64.b64encode(zlib.crc32(b"hello").to_bytes(4, "big")).decode()
    published = {"f": ("crc32", crc, 5)}
    assert crc == "NhCmhg==" and verify_files(tmp_path, published) == 1  # what versitygw/S3 report for b"hello"
    assert verify_files(tmp_path, {"f": ("md5", hashlib.md5(b"hello").hexdigest(), 5)}) == 1
    with pytest.raises(TransientError, match="does not match the md5"):
        verify_files(tmp_path, {"f": ("md5", "0" * 32, 5)})


# ------------------------------------------------------------- Hugging Face calibration datasets


def _dataset_ctx(tmp_path, stage="quantize", revision="main"):
    from qjob_runner.context import Paths, RunContext
    from qjob_runner.reporting import Reporter

    config = RunnerConfig.model_validate(
        {
            "job": "j",
            "stage": stage,
            "model": {"hfRepo": "org/model", "cacheDir": str(tmp_path / "cache")},
            "quantization": {"format": "fp8"},
            "calibration": {
                "dataset": {"huggingFace": {"name": "org/texts", "revision": revision, "textField": "body"}},
                "samples": 3,
            },
            "evaluation": {"samples": 1},
            "outputDir": str(tmp_path / "out"),
        }
    )
    return RunContext(config=config, paths=Paths.from_config(config), reporter=Reporter(stage))


def test_gpu_stages_read_the_dataset_texts_the_fetch_stage_recorded(tmp_path):
    from qjob_runner.modelcache import write_dataset_ref
    from qjob_runner.steps.data import read_texts

    ctx = _dataset_ctx(tmp_path)
    root = tmp_path / "cache"
    entry = root / "datasets" / "k.jsonl"
    entry.parent.mkdir(parents=True)
    entry.write_text("".join(f'{{"text": "sample {i}"}}\n' for i in range(4)))
    write_dataset_ref(root, ctx.config.calibration.dataset.hugging_face, 4, entry, "c" * 40)
    texts, source = read_texts(ctx, 4)
    assert texts == [f"sample {i}" for i in range(4)] and source == "hf://org/texts/:train"
    assert ctx.metrics["calibrationCacheEntry"] == "datasets/k.jsonl"


def test_a_dataset_the_fetch_stage_did_not_record_fails_with_the_fix(tmp_path):
    from qjob_runner.errors import InvalidInput
    from qjob_runner.steps.data import read_texts

    with pytest.raises(InvalidInput, match="no record of this job's calibration dataset"):
        read_texts(_dataset_ctx(tmp_path), 4)


def test_another_revision_or_sample_count_is_another_request():
    from qjob_api.v1alpha1 import HuggingFaceDataset
    from qjob_runner.modelcache import dataset_request

    base = HuggingFaceDataset(name="org/texts")
    assert dataset_request(base, 4) == dataset_request(HuggingFaceDataset(name="org/texts"), 4)
    assert dataset_request(base, 4) != dataset_request(base, 5)
    assert dataset_request(base, 4) != dataset_request(base.model_copy(update={"revision": "v2"}), 4)


def test_fetching_a_dataset_without_the_datasets_library_is_a_config_error(tmp_path):
    """The dev environment has no `datasets` (the runner image has): a pinned commit needs no Hub
    call, so this reaches the streaming step and shows what an image without it says."""
    pytest.importorskip("huggingface_hub")
    from qjob_runner.errors import InvalidConfig
    from qjob_runner.modelcache import fetch_dataset

    try:
        import datasets  # noqa: F401

        pytest.skip("datasets is installed here")
    except ImportError:
        pass
    ctx = _dataset_ctx(tmp_path, stage="fetch", revision="a" * 40)
    with pytest.raises(InvalidConfig, match="needs the `datasets` library"):
        fetch_dataset(ctx, tmp_path / "cache", lambda *_: None)
    assert not list((tmp_path / "cache" / "datasets").glob("*.jsonl"))
