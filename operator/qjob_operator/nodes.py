"""Which nodes could ever run a stage: the fail-fast check behind ``NoMatchingNodes``.

Evaluated on the operator's in-memory node index (kept here, from its own node watch:
``Kube.list_and_watch``), from the same ``NodeRequirement`` that the
Job's node affinity is built from, so the check and the scheduler agree. ``NodeFit`` evaluates
each distinct requirement (tolerations included) once per change of the node index, not per reconcile:
on a 5,000-node cluster a reconcile then costs a dictionary lookup, not a pass over every node.
"""

from __future__ import annotations

import sys
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


def node_architecture(labels: Mapping[str, str], config: OperatorConfig) -> str:
    """A node's GPU architecture from its compute capability labels, by the operator's configured
    mapping (the one scheduling uses); else its family label; else ``unknown``."""
    keys = config.node_labels
    try:
        arch = config.architecture_of(labels[keys.compute_major], labels[keys.compute_minor])
    except (KeyError, TypeError, ValueError):
        arch = None
    return arch.value if arch else labels.get(keys.family, "unknown")


def _shared(mapping: Mapping[str, Any] | None) -> dict[str, str]:
    # Thousands of nodes repeat the same label keys and values: one string object each.
    return {sys.intern(k): sys.intern(str(v)) for k, v in (mapping or {}).items()}


def node_view(node: Mapping[str, Any]) -> dict[str, Any]:
    """What fit reads of a node (as the API returns it): labels, unschedulable, taints, allocatable."""
    spec, status = node.get("spec") or {}, node.get("status") or {}
    return {
        "metadata": {"name": sys.intern(node["metadata"]["name"]), "labels": _shared(node["metadata"].get("labels"))},
        "spec": {"unschedulable": spec.get("unschedulable"), "taints": spec.get("taints") or []},
        "status": {"allocatable": _shared(status.get("allocatable"))},
    }


class NodeFit:
    """The node index (``node_view`` of each node, fed by ``changed()`` from the operator's node
    watch) and fit results, cached until a node changes in what fit reads."""

    def __init__(self, config: OperatorConfig):
        self.config = config
        self.revision = 0  # bumped by changed()
        self._views: dict[str, dict[str, Any]] = {}
        self._computed_at = -1
        self.nodes: list[Mapping[str, Any]] = []  # as of the last refresh()
        self._matches: dict[str, list[str]] = {}  # repr(requirement) -> node names
        self.products: dict[str, str] = {}  # node -> GPU product
        self.architectures: dict[str, str] = {}  # node -> GPU architecture

    def changed(self, name: str, node: Mapping[str, Any] | None) -> bool:
        """Records a node (None: deleted); True if what fit reads of it changed (a heartbeat does not)."""
        view = None if node is None else node_view(node)
        if view == self._views.get(name):
            return False
        if view is None:
            del self._views[name]
        else:
            self._views[sys.intern(name)] = view
        self.revision += 1
        return True

    def refresh(self) -> None:
        if self._computed_at == self.revision:
            return
        self.nodes = list(self._views.values())
        self._matches = {}
        self.products, self.architectures = {}, {}
        for node in self.nodes:
            labels = node["metadata"].get("labels") or {}
            name = node["metadata"]["name"]
            self.products[name] = labels.get(self.config.node_labels.product, "")
            self.architectures[name] = node_architecture(labels, self.config)
        self._computed_at = self.revision

    def matching(self, req: NodeRequirement) -> list[str]:
        key = repr(req)  # its dicts make it unhashable; its repr is exact
        if key not in self._matches:
            self._matches[key] = matching_nodes(self.nodes, req, self.config)
        return self._matches[key]
