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
    nodes = {"h1": node("h1", "9", "0"), "a1": node("a1", "8", "9")}
    listed = []

    def index():
        listed.append(1)
        return list(nodes.values())

    fit = NodeFit(CONFIG)
    for name, body in nodes.items():
        assert fit.changed(name, body)
    for _ in range(100):  # a hundred reconciles, one pass over the nodes
        fit.refresh(index)
        assert fit.matching(HOPPER) == ["h1"]
    assert len(listed) == 1
    assert fit.architectures == {"h1": "hopper", "a1": "ada"} and fit.products["h1"] == "gpu-90"

    assert not fit.changed("h1", node("h1", "9", "0"))  # a heartbeat: nothing fit depends on
    fit.refresh(index)
    assert len(listed) == 1

    nodes["h2"] = node("h2", "9", "0")
    assert fit.changed("h2", nodes["h2"])
    fit.refresh(index)
    assert fit.matching(HOPPER) == ["h1", "h2"] and len(listed) == 2
    del nodes["h1"]
    assert fit.changed("h1", None)
    fit.refresh(index)
    assert fit.matching(HOPPER) == ["h2"]
