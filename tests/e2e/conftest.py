"""End-to-end fixtures: the pod runner harness (``qjob_dev.podrunner``) turns runner pods bound to
simulated nodes into local jobrunner processes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from qjob_dev.podrunner import PodRunner
from qjob_dev.qjobs import make_artifacts_pvc
from qjob_dev.tiny_models import make_tiny_llama, pydoc_paragraphs


@pytest.fixture(scope="session")
def podrunner(cluster, tmp_path_factory):
    runner = PodRunner(
        cluster.kubeconfig,
        tmp_path_factory.mktemp("podrunner"),
        max_parallel=2,
        extra_env={
            "QJOB_TORCH_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            # The runner processes import the same code as the tests (a checkout on PYTHONPATH
            # rather than the venv's installed copy).
            **({"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}),
        },
        # Only the e2e tests' pods: other tests in the session use external pods of their own.
        label_selector="localcluster.qjob.dev/external=true,e2e.qjob.dev/podrunner=true",
    ).start()
    try:
        yield runner
    finally:
        runner.stop()


def pv_folder(kube_api, namespace: str, claim: str = "artifacts") -> Path:
    from kubernetes import client

    core = client.CoreV1Api(kube_api)
    pv = core.read_persistent_volume(core.read_namespaced_persistent_volume_claim(claim, namespace).spec.volume_name)
    folder = Path(pv.spec.host_path.path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def e2e_ns(namespace, kube_api, operator, podrunner):
    """A namespace with an artifacts PVC holding a tiny Llama and a calibration ConfigMap."""
    from kubernetes import client

    make_artifacts_pvc(kube_api, namespace)
    texts = pydoc_paragraphs()
    client.CoreV1Api(kube_api).create_namespaced_config_map(
        namespace,
        {
            "metadata": {"name": "calibration"},
            "data": {"samples.jsonl": "\n".join(json.dumps({"text": t}) for t in texts[:200])},
        },
    )
    make_tiny_llama(pv_folder(kube_api, namespace) / "models" / "tiny-llama")
    return namespace
