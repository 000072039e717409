from __future__ import annotations

import copy
from datetime import UTC, datetime

import pytest
from qjob_api.v1alpha1 import QuantizationJobSpec
from qjob_operator.config import OperatorConfig

NOW = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC)

SPEC = {
    "model": {"huggingFace": {"repo": "meta-llama/Llama-3.1-8B", "tokenSecretRef": {"name": "hf"}}},
    "quantization": {"format": "fp8"},
    "calibration": {"dataset": {"configMap": {"name": "calib", "key": "text.jsonl"}}, "samples": 128},
    "engines": [{"architecture": "hopper"}],
    "output": {"pvc": {"claimName": "artifacts"}},
}


@pytest.fixture
def spec_dict() -> dict:
    return copy.deepcopy(SPEC)


@pytest.fixture
def spec(spec_dict) -> QuantizationJobSpec:
    return QuantizationJobSpec.model_validate(spec_dict)


@pytest.fixture
def config() -> OperatorConfig:
    return OperatorConfig()


def cr_body(spec_dict: dict, status: dict | None = None, created: str = "2026-11-22T11:59:00Z") -> dict:
    return {
        "apiVersion": "qjob.dev/v1alpha1",
        "kind": "QuantizationJob",
        "metadata": {"name": "llama", "namespace": "ml", "uid": "uid-1", "generation": 1, "creationTimestamp": created},
        "spec": spec_dict,
        "status": status or {},
    }


def gpu_node(
    name: str, major: str, minor: str, gpus: int = 8, memory: int = 81559, product: str = "NVIDIA-H100-80GB-HBM3"
) -> dict:
    return {
        "metadata": {
            "name": name,
            "labels": {
                "nvidia.com/gpu.compute.major": major,
                "nvidia.com/gpu.compute.minor": minor,
                "nvidia.com/gpu.memory": str(memory),
                "nvidia.com/gpu.product": product,
            },
        },
        "spec": {"taints": [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]},
        "status": {"allocatable": {"nvidia.com/gpu": str(gpus)}},
    }


def fitted(nodes, config):
    """A NodeFit over a fixed node list, as the reconciler holds one over the node index."""
    from qjob_operator.nodes import NodeFit

    fit = NodeFit(config)
    for node in nodes:
        fit.changed(node["metadata"]["name"], node)
    fit.refresh()
    return fit
