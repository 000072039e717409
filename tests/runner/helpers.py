"""Runner test helpers (the tiny models themselves are in ``qjob_dev.tiny_models``)."""

from __future__ import annotations

import os
from pathlib import Path

from qjob_api.runner import RunnerS3
from qjob_runner.reporting import Reporter


class Recording(Reporter):
    """Keeps every progress update (the state keeps only the latest)."""

    def __init__(self, stage: str):
        super().__init__(stage)
        self.updates: list[dict] = []

    def update(self, **fields) -> None:
        self.updates.append(fields)
        super().update(**fields)


def runner_config(**overrides) -> dict:
    cfg = {
        "apiVersion": "qjob.dev/runner/v1",
        "job": "test",
        "stage": "quantize",
        "model": {"path": None, "task": "causal-lm", "dtype": "float32"},
        "quantization": {"format": "fp8"},
        "calibration": {"dataset": {"path": None}, "samples": 16, "sequenceLength": 64, "batchSize": 4},
        "evaluation": {"enabled": True, "samples": 8},
        "outputDir": None,
    }
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


def checkpoint_tensors(folder: Path) -> dict:
    """Every tensor of a safetensors checkpoint folder, by name."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                out[k] = sf.get_tensor(k)
    return out


def as_bytes(t):
    """A tensor's storage as bytes (compares FP8 tensors exactly, bit for bit)."""
    import torch

    return t.contiguous().view(-1).view(torch.uint8)


# ------------------------------------------------------------------------------ S3 (real server)


def location(server, bucket: str, role: str = "output", **over) -> RunnerS3:
    """The RunnerS3 the operator would build for ``spec.<role>.s3`` on the test server."""
    fields = {
        "field": f"spec.{role}.s3",
        "bucket": bucket,
        "prefix": "ns/job",
        "credentials_env": f"QJOB_S3_{role.upper()}",
    }
    if server is not None:
        fields.update(endpoint=server.endpoint, region=server.region)
    return RunnerS3(**{**fields, **over})


os.environ.setdefault("HF_HUB_OFFLINE", "1")
