"""What the scripts under benchmarks/ share: the control plane they run on, the memory figure they
read, and one way of saving their results."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .localcluster import REPO_ROOT, LocalCluster, proc_rss_kib
from .operator_process import install_crds

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


@contextlib.contextmanager
def control_plane(
    workdir: Path, kubeconfig: str | Path | None = None, keep_logs: bool = False, **options: Any
) -> Iterator[tuple[LocalCluster, Any]]:
    """The cluster a benchmark runs on, its CRDs installed, and an admin API client: the running one
    ``kubeconfig`` names (left running), else a fresh local cluster under ``workdir`` (``options``
    go to LocalCluster, e.g. ``audit=True``), stopped afterwards (``keep_logs``: its logs stay)."""
    from kubernetes import config as kconfig

    with contextlib.ExitStack() as cleanup:
        if kubeconfig:
            cluster = LocalCluster.attach(kubeconfig)
        else:
            cluster = LocalCluster(workdir / "cluster", **options).up(timeout=180)
            cleanup.callback(cluster.down, keep_logs=keep_logs)
        api = cleanup.enter_context(kconfig.new_client_from_config(config_file=str(cluster.kubeconfig)))
        install_crds(cluster)
        yield cluster, api


def rss_mib(pid: int) -> float:
    """A process's resident memory; NaN once it is gone (no figure rather than a wrong one)."""
    kib = proc_rss_kib(pid)
    return kib / 1024 if kib else float("nan")


def report_results(path: Path, results: dict[str, Any], not_shown: tuple[str, ...] = ()) -> None:
    """Print a benchmark's figures (less the keys ``not_shown``: long lists, parts printed as they
    came) and write them all to ``path`` as JSON."""
    print(json.dumps({k: v for k, v in results.items() if k not in not_shown}, indent=2), flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    shown = path.resolve().relative_to(REPO_ROOT) if path.resolve().is_relative_to(REPO_ROOT) else path
    print(f"written to {shown}")
