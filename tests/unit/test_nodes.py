"""Node fit is computed once per change of the node index, shared by every job."""

from __future__ import annotations

from qjob_api.capabilities import GPUArchitecture
from qjob_operator.config import OperatorConfig
from qjob_operator.nodes import NodeFit
from qjob_operator.plan import NodeRequirement

CONFIG = OperatorConfig()
HOPPER = NodeRequirement(GPUArchitecture.HOPPER, (("9", "0"),), 1, None)


def node(name: str, major: str, minor: str, gpus: str = "8") -> dict:
    labels = {"nvidia.com/gpu.compute.major": major, "nvidia.com/gpu.compute.minor": minor,
              "nvidia.com/gpu.product": f"gpu-{major}{minor}"}  # fmt: skip
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {},
        "status": {"allocatable": {"nvidia.com/gpu": gpus}},
    }


def test_fit_is_cached_until_a_node_changes():
    fit = NodeFit(CONFIG)
    for name, body in {"h1": node("h1", "9", "0"), "a1": node("a1", "8", "9")}.items():
        assert fit.changed(name, body)
    fit.refresh()
    passed = fit.nodes
    for _ in range(100):  # a hundred reconciles, one pass over the nodes
        fit.refresh()
        assert fit.matching(HOPPER) == ["h1"]
    assert fit.nodes is passed
    assert fit.architectures == {"h1": "hopper", "a1": "ada"} and fit.products["h1"] == "gpu-90"

    heartbeat = node("h1", "9", "0")
    heartbeat["status"]["conditions"] = [{"type": "Ready", "lastHeartbeatTime": "2026-12-01T10:00:00Z"}]
    assert not fit.changed("h1", heartbeat)  # nothing fit reads changed
    fit.refresh()
    assert fit.nodes is passed

    assert fit.changed("h2", node("h2", "9", "0"))
    fit.refresh()
    assert fit.matching(HOPPER) == ["h1", "h2"] and fit.nodes is not passed
    assert fit.changed("h1", None)
    assert not fit.changed("h1", None)  # already gone
    fit.refresh()
    assert fit.matching(HOPPER) == ["h2"]


def test_the_index_keeps_only_what_fit_reads():
    body = node("h1", "9", "0")
    body["metadata"]["managedFields"] = [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}]
    body["status"]["images"] = [{"names": ["registry.example/big:1"], "sizeBytes": 1 << 30}]
    body["spec"]["taints"] = [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]
    fit = NodeFit(CONFIG)
    fit.changed("h1", body)
    fit.refresh()
    (kept,) = fit.nodes
    assert kept == {
        "metadata": {"name": "h1", "labels": body["metadata"]["labels"]},
        "spec": {"unschedulable": None, "taints": [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]},
        "status": {"allocatable": {"nvidia.com/gpu": "8"}},
    }
