"""qjob CLI: local-mode path mapping and status formatting (pure parts; `run` itself is exercised
end to end in tests/e2e)."""

from __future__ import annotations

from pathlib import Path

import pytest
from qjob_api.v1alpha1 import QuantizationJob
from qjob_cli.main import format_status, local_runner_config


def _job(spec_dict):
    return QuantizationJob.model_validate(
        {
            "apiVersion": "qjob.dev/v1alpha1",
            "kind": "QuantizationJob",
            "metadata": {"name": "llama", "namespace": "ml"},
            "spec": spec_dict,
        }
    )


def test_local_config_maps_claims_and_configmaps_to_local_paths(spec_dict, tmp_path):
    spec_dict["model"] = {"pvc": {"claimName": "models", "path": "tiny-llama"}}
    config = local_runner_config(
        _job(spec_dict),
        "quantize",
        {"models": tmp_path / "m"},
        {"calib": {"text.jsonl": '{"text": "hello"}\n'}},
        tmp_path / "work",
    )
    assert config.model.path == str(tmp_path / "m" / "tiny-llama")
    assert config.output_dir == str(tmp_path / "work" / "pvc" / "artifacts" / "ml" / "llama")
    assert Path(config.calibration.dataset.path).read_text() == '{"text": "hello"}\n'
    assert config.reporting.kind == "file"


def test_local_config_maps_the_model_cache_and_the_s3_staging(spec_dict, tmp_path):
    spec_dict["model"] = {"s3": {"bucket": "models", "prefix": "tiny"}, "cacheClaimName": "model-cache"}
    spec_dict["output"] = {"s3": {"bucket": "artifacts"}}
    cm = {"calib": {"text.jsonl": "{}"}}
    fetch = local_runner_config(_job(spec_dict), "fetch", {"model-cache": tmp_path / "cache"}, cm, tmp_path / "w")
    assert fetch.model.cache_dir == str(tmp_path / "cache")
    quantize = local_runner_config(_job(spec_dict), "quantize", {}, cm, tmp_path / "w")
    assert quantize.model.cache_dir == str(tmp_path / "w" / "pvc" / "model-cache")
    assert quantize.output_dir == str(tmp_path / "w" / "cache" / "output")  # staged, then uploaded
    assert quantize.output_uri == "s3://artifacts/ml/llama"


def test_local_config_names_a_missing_configmap(spec_dict, tmp_path):
    with pytest.raises(SystemExit, match="add the ConfigMap document"):
        local_runner_config(_job(spec_dict), "quantize", {}, {}, tmp_path)


def test_local_config_rejects_unknown_stage(spec_dict, tmp_path):
    with pytest.raises(SystemExit, match="it has: quantize, build-hopper"):
        local_runner_config(_job(spec_dict), "build-ada", {}, {}, tmp_path)


def test_format_status_reads_well():
    obj = {
        "metadata": {"name": "llama", "namespace": "ml"},
        "status": {
            "phase": "Running",
            "reason": "Running",
            "progress": {"percent": 42, "stage": "quantize/calibrate", "etaSeconds": 90},
            "stages": [
                {
                    "name": "quantize",
                    "phase": "Running",
                    "node": "h100-0",
                    "gpuProduct": "NVIDIA-H100-80GB-HBM3",
                    "attempts": 1,
                }
            ],
            "artifacts": [{"kind": "engine", "format": "tensorrt", "architecture": "hopper", "uri": "pvc://a/b"}],
        },
    }
    text = format_status(obj)
    assert "ml/llama: Running (Running)" in text
    assert "progress: 42% in quantize/calibrate, about 90s left" in text
    assert "stage quantize: Running on h100-0 (NVIDIA-H100-80GB-HBM3), attempts 1" in text
    assert "artifact engine/tensorrt [hopper]: pvc://a/b" in text


def test_format_status_shows_who_serves_a_checkpoint():
    runtimes = [
        {"name": "vllm", "minVersion": "0.10.1", "architectures": ["ada", "hopper"], "command": "vllm serve /mnt/a/hf"}
    ]
    obj = {
        "metadata": {"name": "llama", "namespace": "ml"},
        "status": {
            "phase": "Succeeded",
            "artifacts": [{"kind": "checkpoint", "format": "hf", "uri": "pvc://a/hf", "runtimes": runtimes}],
        },
    }
    text = format_status(obj)
    assert (
        "  artifact checkpoint/hf: pvc://a/hf\n    serve with vllm 0.10.1+ on ada, hopper: vllm serve /mnt/a/hf" in text
    )
