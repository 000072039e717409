"""inspect: the model's size from its safetensors headers and config.json, without the weights.

The operator runs this as a short pod without GPUs before it sizes the quantize stage
(spec.resources.gpus 0) when the job has no fetch stage; a fetch stage reads the same headers of
the files it downloaded (``fetched_size``). A local folder (a mounted PVC) is read directly: each safetensors file
starts with an 8-byte header length and a JSON header giving every tensor's dtype, shape and byte
range. A Hugging Face repository is read with ``huggingface_hub.get_safetensors_metadata``, which
fetches only those headers. ``.bin`` (pickle) checkpoints carry no such header: the size is then
unknown and the step says so instead of guessing.
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from math import prod
from pathlib import Path
from typing import Any

from qjob_api.v1alpha1 import ModelSize

from ..context import RunContext
from ..errors import InvalidConfig, InvalidInput, TransientError

NO_SIZE_FIX = "convert the checkpoint to safetensors (save_pretrained does), or set spec.resources.gpus to a number"


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of one safetensors file (tensor name -> dtype, shape, data_offsets)."""
    fix = f"re-upload or re-download {path.name}"
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InvalidInput(f"{path} is truncated ({path.stat().st_size} bytes)", fix)
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or 8 + n > path.stat().st_size:
            raise InvalidInput(f"{path} is not a safetensors file (header length {n})", fix)
        try:
            return json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InvalidInput(f"{path} is corrupt: its safetensors header is not valid JSON", fix) from None


def tensor_sizes(headers: list[dict[str, Any]]) -> tuple[int, int, str]:
    """(bytes, elements, dominant dtype) over the tensors of every header."""
    total, elements, by_dtype = 0, 0, Counter()
    for header in headers:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            total += end - start
            count = prod(info["shape"])
            elements += count
            by_dtype[info["dtype"]] += end - start
    return total, elements, (by_dtype.most_common(1)[0][0] if by_dtype else "unknown")


def architecture_facts(config: dict[str, Any]) -> dict[str, int | None]:
    """The config.json numbers the memory model needs (multimodal configs nest the text model)."""
    text = config.get("text_config") or config.get("llm_config") or config
    heads = text.get("num_attention_heads")
    hidden = text.get("hidden_size") or text.get("d_model")
    return {
        "layers": text.get("num_hidden_layers") or text.get("n_layer") or text.get("num_layers"),
        "hidden_size": hidden,
        "intermediate_size": text.get("intermediate_size") or text.get("ffn_dim") or text.get("n_inner"),
        "vocab_size": text.get("vocab_size") or config.get("vocab_size"),
        "kv_heads": text.get("num_key_value_heads") or heads,
        "head_dim": text.get("head_dim") or (hidden // heads if hidden and heads else None),
    }


def local_size(folder: Path) -> ModelSize:
    if not (folder / "config.json").is_file():
        raise InvalidInput(
            f"model folder {folder} has no config.json",
            "point spec.model.pvc at the folder that holds config.json (a Hugging Face model folder)",
        )
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InvalidInput(f"model folder {folder} has no *.safetensors weights, so its size is unknown", NO_SIZE_FIX)
    weight_bytes, parameters, dtype = tensor_sizes([read_header(p) for p in files])
    return ModelSize(
        weight_bytes=weight_bytes,
        parameters=parameters,
        dtype=dtype,
        **architecture_facts(json.loads((folder / "config.json").read_text())),
    )


def fetched_size(folder: Path) -> ModelSize | None:
    """The size of a model the fetch stage downloaded; None for a checkpoint without safetensors
    weights (no header to read: the operator then refuses automatic sizing rather than guess)."""
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        return None
    return local_size(folder)


def hub_size(repo: str, revision: str) -> ModelSize:
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import get_safetensors_metadata, hf_hub_download

    token = os.environ.get("HF_TOKEN") or None
    try:
        meta = get_safetensors_metadata(repo, revision=revision, token=token)
        config = json.loads(Path(hf_hub_download(repo, "config.json", revision=revision, token=token)).read_text())
    except hf_errors.NotASafetensorsRepoError:
        raise InvalidInput(
            f"{repo}@{revision} has no safetensors weights, so its size is unknown", NO_SIZE_FIX
        ) from None
    except (hf_errors.GatedRepoError, hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError) as exc:
        raise InvalidInput(
            f"cannot read {repo}@{revision}: {type(exc).__name__}",
            "check spec.model.huggingFace (repo, revision) and tokenSecretRef",
        ) from None
    except (hf_errors.HfHubHTTPError, hf_errors.LocalEntryNotFoundError, OSError) as exc:
        raise TransientError(f"cannot reach the Hugging Face Hub for {repo}: {exc}", "retried automatically") from None
    headers = [
        {name: {"dtype": t.dtype, "shape": t.shape, "data_offsets": t.data_offsets} for name, t in f.tensors.items()}
        for f in meta.files_metadata.values()
    ]
    weight_bytes, parameters, dtype = tensor_sizes(headers)
    return ModelSize(weight_bytes=weight_bytes, parameters=parameters, dtype=dtype, **architecture_facts(config))


def run(ctx: RunContext) -> None:
    m = ctx.config.model
    if m.path:
        size = local_size(Path(m.path))
    elif m.hf_repo:
        size = hub_size(m.hf_repo, m.revision)
    else:
        raise InvalidConfig("the model has neither path nor hf_repo", "set spec.model.pvc or spec.model.huggingFace")
    ctx.model_size = size
    ctx.reporter.update(
        message=f"{size.weight_bytes / 1e9:.2f} GB of {size.dtype} weights, {size.parameters / 1e9:.2f}B parameters"
    )
