"""Library versions and GPU facts recorded in every result and manifest."""

from __future__ import annotations

import importlib.metadata
import platform

from qjob_api.work import WORK_LIBRARIES

#: Distributions whose versions go into the manifest (the version mismatches users hit are
#: between these: ModelOpt / transformers / TensorRT / TensorRT-LLM): the ones that are part of
#: the work key, and the ones that only read inputs or check outputs. (CUDA's comes from torch.)
TRACKED = (
    *(name for name in WORK_LIBRARIES if name != "cuda"),
    *("huggingface-hub", "tokenizers", "onnxruntime", "datasets", "numpy", "pydantic"),
)


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in TRACKED:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        import torch

        if torch.version.cuda:
            out["cuda"] = torch.version.cuda
        if torch.backends.cudnn.is_available():
            out["cudnn"] = str(torch.backends.cudnn.version())
    except Exception:  # noqa: BLE001 - versions are best effort
        pass
    return out


def gpu_info() -> list[dict[str, object]]:
    """One entry per visible GPU: product name, compute capability, memory."""
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        gpus = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append(
                {
                    "index": i,
                    "product": props.name,
                    "compute_capability": f"{props.major}.{props.minor}",
                    "memory_bytes": int(props.total_memory),
                    "multiprocessors": int(props.multi_processor_count),
                }
            )
        return gpus
    except Exception:  # noqa: BLE001
        return []
