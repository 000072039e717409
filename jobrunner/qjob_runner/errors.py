"""Typed runner failures, each mapped to an ``ExitCode``.

Every message names the problem *and* the fix: it ends up in the QuantizationJob's status (through
the termination message), where the person who applied the manifest reads it.
"""

from __future__ import annotations

from qjob_api.reasons import EXIT_CODE_REASONS, Reason
from qjob_api.runner import ExitCode


class RunnerError(Exception):
    """Base class: a failure the runner understood. ``exit_code`` decides retry or not, and the
    status reason (one table for runner and operator: ``qjob_api.reasons``)."""

    exit_code: ExitCode = ExitCode.TRANSIENT

    @property
    def reason(self) -> Reason:
        return EXIT_CODE_REASONS[self.exit_code]

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}. Fix: {fix}" if fix else problem)


class InvalidConfig(RunnerError):  # noqa: N818 - named after the stable reason it reports (qjob_api.reasons)
    """Bad config or unsupported combination: retrying cannot help."""

    exit_code = ExitCode.INVALID_CONFIG


class UnsupportedFormat(InvalidConfig):
    """The format (or KV cache format) has no kernels on a target architecture, or needs CUDA."""


class ToolMissing(InvalidConfig):
    """A library this step needs (TensorRT, TensorRT-LLM, ModelOpt) is not installed in the image."""


class InvalidInput(RunnerError):  # noqa: N818 - named after the stable reason it reports (qjob_api.reasons)
    """Model or data missing or corrupt: retrying cannot help."""

    exit_code = ExitCode.INVALID_INPUT


class QualityGateFailed(RunnerError):  # noqa: N818 - named after the stable reason it reports (qjob_api.reasons)
    exit_code = ExitCode.QUALITY_GATE_FAILED


class TransientError(RunnerError):
    """Network, hub or filesystem hiccup: the operator retries the pod."""

    exit_code = ExitCode.TRANSIENT


class RendezvousFailed(RunnerError):  # noqa: N818 - named after the stable reason it reports (qjob_api.reasons)
    """The ranks of a multi-pod stage could not meet (rank 0 unreachable, a rank missing):
    the whole stage is retried as a new gang."""

    exit_code = ExitCode.RENDEZVOUS_FAILED


class OutOfMemory(RunnerError):  # noqa: N818 - reported as OOMKilled, as the kubelet's OOM is
    exit_code = ExitCode.OUT_OF_MEMORY


def classify(exc: BaseException) -> RunnerError:
    """Turn any exception into a RunnerError (unknown ones are treated as transient)."""
    if isinstance(exc, RunnerError):
        return exc
    name = type(exc).__name__
    text = str(exc)
    try:  # torch is optional for the classifier (the CLI imports this module early)
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return OutOfMemory(
                f"CUDA out of memory: {text.splitlines()[0] if text else name}",
                "set spec.calibration.batchSize lower (or 0 to probe), ask for more GPUs "
                "(spec.resources.gpus) so the model is spread across them, or minGpuMemory for larger GPUs",
            )
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, MemoryError):
        return OutOfMemory("host memory exhausted", "raise spec.resources.memory (the pod's memory limit)")
    if "out of memory" in text.lower() and "cuda" in text.lower():
        return OutOfMemory(text.splitlines()[0], "lower spec.calibration.batchSize or use more/larger GPUs")
    if _lost_peer(exc):
        return TransientError(
            f"another rank of this stage failed or was stopped ({text.splitlines()[0] if text else name})",
            "the stage is retried as a whole; the failing rank's pod names the cause",
        )
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return TransientError(
            f"network error: {name}: {text}", "the pod is retried; check the cluster's egress if it persists"
        )
    if isinstance(exc, OSError) and getattr(exc, "errno", None) in {28}:  # ENOSPC
        return TransientError(f"disk full: {text}", "give the output PersistentVolumeClaim more space")
    return TransientError(
        f"unexpected {name}: {text}", "this is likely a runner bug; the pod is retried, report it if it persists"
    )


#: What a collective raises on the ranks that are left when a peer dies: gloo's socket errors
#: (seen in tests/runner/test_ranks.py) and NCCL's remote error ("remote process exited or there
#: was a network error"). A peer lost under NCCL can also just hang the collective: then the Job
#: controller, failing the attempt on the dead rank's pod, stops the others.
PEER_LOST_MARKERS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "remote process exited",
)


def _lost_peer(exc: BaseException) -> bool:
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return False
    except ImportError:  # pragma: no cover
        return False
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, OSError)) and any(m in text for m in PEER_LOST_MARKERS)
