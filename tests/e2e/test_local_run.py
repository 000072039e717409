"""`qjob run -f job.yaml --local`: a user checks a manifest on their own machine, no cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from qjob_dev.tiny_models import make_tiny_llama, pydoc_paragraphs

pytestmark = pytest.mark.slow


def test_local_run_of_a_manifest_writes_artifacts(tmp_path):
    volume = tmp_path / "models-volume"
    make_tiny_llama(volume / "tiny-llama")
    manifest = tmp_path / "job.yaml"
    manifest.write_text(
        yaml.safe_dump_all(
            [
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": "calibration"},
                    "data": {"samples.jsonl": "\n".join(json.dumps({"text": t}) for t in pydoc_paragraphs()[:80])},
                },
                {
                    "apiVersion": "qjob.dev/v1alpha1",
                    "kind": "QuantizationJob",
                    "metadata": {"name": "local-check"},
                    "spec": {
                        "model": {"pvc": {"claimName": "models", "path": "tiny-llama"}},
                        "quantization": {"format": "fp8"},
                        "calibration": {
                            "dataset": {"configMap": {"name": "calibration", "key": "samples.jsonl"}},
                            "samples": 8,
                            "sequenceLength": 64,
                            "batchSize": 4,
                        },
                        "evaluation": {"samples": 4},
                        "output": {"pvc": {"claimName": "out"}},
                    },
                },
            ]
        )
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "qjob"),
            "run",
            "-f",
            str(manifest),
            "--local",
            "--volume",
            f"models={volume}",
            "--volume",
            f"out={out}",
            "--workdir",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "QJOB_TORCH_THREADS": "1", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["outcome"] == "Succeeded"
    assert any(a["kind"] == "checkpoint" for a in result["artifacts"])
    assert list((out / "default" / "local-check").rglob("hf_quant_config.json"))


def test_local_run_names_the_missing_configmap(tmp_path):
    manifest = tmp_path / "job.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "qjob.dev/v1alpha1",
                "kind": "QuantizationJob",
                "metadata": {"name": "x"},
                "spec": {
                    "model": {"pvc": {"claimName": "models"}},
                    "quantization": {"format": "fp8"},
                    "calibration": {"dataset": {"configMap": {"name": "calibration", "key": "samples.jsonl"}}},
                    "output": {"pvc": {"claimName": "out"}},
                },
            }
        )
    )
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "qjob"), "run", "-f", str(manifest), "--local"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "calibration ConfigMap 'calibration'" in proc.stderr and "add the ConfigMap document" in proc.stderr
