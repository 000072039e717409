"""Calibrated state kept between attempts of one job, as data only: tensors in safetensors, the
ModelOpt state in JSON. Nothing here unpickles or imports by name, so a file planted on the
output claim can at worst be refused, never run code with the runner's token, Secrets and GPUs.

A state file belongs to one QuantizationJob: its name carries the job uid, the JSON records the
uid and the safetensors file's SHA-256, and ``load`` refuses a file whose uid or digest differ.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

STATE_FORMAT = 2

_TUPLE, _SIZE, _DTYPE, _ITEMS = "$tuple", "$size", "$dtype", "$items"


class StateError(ValueError):
    """The state file is unusable (missing, foreign, tampered with, or of another format)."""


def encode(obj: Any) -> Any:
    """JSON-able form of a ModelOpt state: str-keyed dicts, lists, scalars, and tagged tuples,
    torch.Size, torch.dtype and dicts with non-string keys. Anything else is refused."""
    import torch

    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Size):
        return {_SIZE: list(obj)}
    if isinstance(obj, tuple):
        return {_TUPLE: [encode(v) for v in obj]}
    if isinstance(obj, list):
        return [encode(v) for v in obj]
    if isinstance(obj, torch.dtype):
        return {_DTYPE: str(obj).removeprefix("torch.")}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: encode(v) for k, v in obj.items()}
        return {_ITEMS: [[encode(k), encode(v)] for k, v in obj.items()]}
    raise TypeError(f"cannot store {type(obj).__name__} in resume state")


def decode(obj: Any) -> Any:
    import torch

    if isinstance(obj, list):
        return [decode(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if set(obj) == {_TUPLE}:
        return tuple(decode(v) for v in obj[_TUPLE])
    if set(obj) == {_SIZE}:
        return torch.Size(int(v) for v in obj[_SIZE])
    if set(obj) == {_DTYPE}:
        dtype = getattr(torch, str(obj[_DTYPE]), None)
        if not isinstance(dtype, torch.dtype):
            raise StateError(f"unknown dtype {obj[_DTYPE]!r}")
        return dtype
    if set(obj) == {_ITEMS}:
        return {_hashable(decode(k)): decode(v) for k, v in obj[_ITEMS]}
    return {k: decode(v) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def paths(work_dir: Path, job_uid: str, key: str) -> tuple[Path, Path]:
    stem = f"calibrated-{job_uid}-{key}"
    return work_dir / f"{stem}.json", work_dir / f"{stem}.safetensors"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def save(work_dir: Path, job_uid: str, key: str, modelopt_state: dict[str, Any], tensors: dict[str, Any]) -> Path:
    """Writes the tensors, then the JSON that vouches for them (the JSON appears last, atomically)."""
    from safetensors.torch import save_file

    meta_path, tensor_path = paths(work_dir, job_uid, key)
    work_dir.mkdir(parents=True, exist_ok=True)
    doc = {"format": STATE_FORMAT, "jobUid": job_uid, "key": key, "modelopt_state": encode(modelopt_state)}
    suffix = f".tmp-{os.getpid()}"
    tmp_tensors = tensor_path.with_name(tensor_path.name + suffix)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_tensors))
    os.replace(tmp_tensors, tensor_path)
    doc["tensorsSha256"] = _sha256(tensor_path)
    tmp_meta = meta_path.with_name(meta_path.name + suffix)
    tmp_meta.write_text(json.dumps(doc))
    os.replace(tmp_meta, meta_path)
    return meta_path


def load(work_dir: Path, job_uid: str, key: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(modelopt_state, tensors) of this job's state, or StateError saying why not."""
    from safetensors.torch import load_file

    meta_path, tensor_path = paths(work_dir, job_uid, key)
    if not meta_path.is_file() or not tensor_path.is_file():
        raise StateError(f"no saved state {meta_path.name}")
    try:
        doc = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise StateError(f"{meta_path.name} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise StateError(f"{meta_path.name} has another format")
    if doc.get("jobUid") != job_uid or doc.get("key") != key:
        raise StateError(f"{meta_path.name} belongs to job {doc.get('jobUid')!r}, not this one ({job_uid})")
    if doc.get("tensorsSha256") != _sha256(tensor_path):
        raise StateError(f"{tensor_path.name} does not match the digest recorded in {meta_path.name}")
    try:
        return decode(doc["modelopt_state"]), load_file(str(tensor_path))
    except Exception as exc:  # noqa: BLE001 - any malformed content is just an unusable state
        raise StateError(f"{meta_path.name}: {exc}") from None
