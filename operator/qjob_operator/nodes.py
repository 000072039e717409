"""Which nodes could ever run a stage: the fail-fast check behind ``NoMatchingNodes``.

Evaluated on the operator's in-memory node index, from the same ``NodeRequirement`` that the
Job's node affinity is built from, so the check and the scheduler agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .config import OperatorConfig
from .plan import NodeRequirement


def _quantity_int(value: Any) -> int:
    try:
        return int(str(value))
    except ValueError:
        return 0


def _tolerated(taint: Mapping[str, Any], tolerations: Iterable[Mapping[str, Any]]) -> bool:
    for tol in tolerations:
        if tol.get("effect") and tol["effect"] != taint.get("effect"):
            continue
        if tol.get("operator") == "Exists" and (not tol.get("key") or tol["key"] == taint.get("key")):
            return True
        if tol.get("key") == taint.get("key") and tol.get("value", "") == taint.get("value", ""):
            return True
    return False


def node_fits(node: Mapping[str, Any], req: NodeRequirement, config: OperatorConfig) -> bool:
    """Whether a node (as the API returns it) can ever host the stage: labels, GPU count and
    taints. Current load is the scheduler's business; this only rules out impossible jobs."""
    labels = node.get("metadata", {}).get("labels") or {}
    keys = config.node_labels
    if node.get("spec", {}).get("unschedulable"):
        return False
    if (
        req.compute_capabilities
        and (labels.get(keys.compute_major), labels.get(keys.compute_minor)) not in req.compute_capabilities
    ):
        return False
    if req.min_gpu_memory_mib and _quantity_int(labels.get(keys.memory_mib, 0)) < req.min_gpu_memory_mib:
        return False
    if any(labels.get(k) != v for k, v in req.node_selector.items()):
        return False
    if _quantity_int((node.get("status", {}).get("allocatable") or {}).get(keys.gpu_resource, 0)) < req.gpus:
        return False
    hard = [t for t in node.get("spec", {}).get("taints") or [] if t.get("effect") in ("NoSchedule", "NoExecute")]
    return all(_tolerated(t, req.tolerations) for t in hard)


def matching_nodes(nodes: Iterable[Mapping[str, Any]], req: NodeRequirement, config: OperatorConfig) -> list[str]:
    return sorted(n["metadata"]["name"] for n in nodes if node_fits(n, req, config))
