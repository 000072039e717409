"""resolve: check the config against what this pod can do, and find the model on disk.

A local folder (a mounted PVC path) or a Hugging Face repository (downloaded through
huggingface_hub with the token in ``HF_TOKEN``, honouring ``HF_HUB_OFFLINE``). The folder is
checked before anything heavy is loaded: config.json, readable safetensors, tokenizer files,
remote code.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from contextlib import contextmanager
from pathlib import Path

from qjob_api.capabilities import (
    CUDA_ONLY_FORMATS,
    ExportFormat,
    KVCacheFormat,
    ModelTask,
    QuantFormat,
    unsupported_reasons,
)
from qjob_api.runner import RunnerModel
from qjob_api.v1alpha1 import serving_refusals

from .. import modelcache, work
from ..context import RunContext
from ..errors import InvalidConfig, InvalidInput, TransientError, UnsupportedFormat

log = logging.getLogger("qjob_runner.resolve")

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
)
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "pytorch_model.bin.index.json")
DOWNLOAD_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.model",
    "*.txt",
    "*.tiktoken",
    "*.py",
    "tokenizer*",
    "1_Pooling/*",
]


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def check_config(ctx: RunContext) -> None:
    cfg = ctx.config
    q = cfg.quantization
    if q.format is None and q.auto_quantize is None:
        raise InvalidConfig(
            "quantization has neither format nor autoQuantize", "set spec.quantization.format (e.g. fp8)"
        )
    if q.format is not None and q.auto_quantize is not None:
        raise InvalidConfig("quantization sets both format and autoQuantize", "set only one of them")
    formats = [q.format] if q.format else list(q.auto_quantize.formats)  # type: ignore[union-attr]
    reasons: list[str] = []
    for fmt in formats:
        reasons += unsupported_reasons(fmt, q.kv_cache, cfg.target_architectures)
    if cfg.engine is not None:
        for fmt in formats:
            reasons += unsupported_reasons(fmt, q.kv_cache, [cfg.engine.architecture])
    if reasons:
        raise UnsupportedFormat(
            "; ".join(dict.fromkeys(reasons)),
            "choose a format that every target architecture runs (spec.quantization.format), or remove "
            "the architectures that cannot run it from spec.engines",
        )
    if problems := serving_refusals(q, cfg.serving, cfg.target_architectures):
        raise UnsupportedFormat("; ".join(problems))
    task = cfg.model.task
    if cfg.serving.runtimes and (ExportFormat.HF not in cfg.export.formats or task != ModelTask.CAUSAL_LM):
        raise InvalidConfig(
            "serving runtimes load the hf checkpoint of a causal LM",
            "keep hf in spec.export.formats and spec.model.task causal-lm, or empty spec.serving.runtimes",
        )
    if task == ModelTask.ENCODER and q.kv_cache != KVCacheFormat.NONE:
        raise InvalidConfig(
            "a KV cache exists only in causal LMs", "set spec.quantization.kvCache to none for an encoder"
        )
    if ExportFormat.ONNX in cfg.export.formats and task != ModelTask.ENCODER:
        raise InvalidConfig(
            "ONNX export is for encoder models",
            "set spec.model.task to encoder or remove onnx from spec.export.formats",
        )
    if ExportFormat.TENSORRT_LLM in cfg.export.formats and task != ModelTask.CAUSAL_LM:
        raise InvalidConfig(
            "the tensorrt_llm checkpoint is for causal LMs", "remove tensorrt_llm from spec.export.formats"
        )
    gate = cfg.evaluation.gate
    if gate and gate.max_perplexity_increase is not None and task != ModelTask.CAUSAL_LM:
        raise InvalidConfig("maxPerplexityIncrease applies to causal LMs", "use minCosineSimilarity for an encoder")
    if gate and gate.min_cosine_similarity is not None and task != ModelTask.ENCODER:
        raise InvalidConfig("minCosineSimilarity applies to encoders", "use maxPerplexityIncrease for a causal LM")
    if not cfg.is_build:
        cuda_only = [f for f in formats if f in CUDA_ONLY_FORMATS]
        if q.kv_cache == KVCacheFormat.NVFP4:
            cuda_only.append(QuantFormat.NVFP4)
        if cuda_only and not cuda_available():
            names = ", ".join(sorted({f.value.upper() for f in cuda_only}))
            raise UnsupportedFormat(
                f"{names} calibration needs a CUDA GPU (ModelOpt has no CPU kernels for FP4 fake "
                "quantization) and this pod sees none",
                "run the quantize stage on a GPU node (spec.resources.gpus >= 1 and a node with "
                "nvidia.com/gpu), or choose a CPU-capable format (fp8, int8, int8_smoothquant, int4_awq, w4a8_awq)",
            )


def check_safetensors(path: Path) -> None:
    """Validate a safetensors file's header against its size without reading the tensors."""
    size = path.stat().st_size
    fix = f"re-upload or re-download {path.name} (compare its sha256 with the source repository)"
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InvalidInput(f"{path} is truncated ({size} bytes)", fix)
            (n,) = struct.unpack("<Q", head)
            if n <= 0 or 8 + n > size:
                raise InvalidInput(
                    f"{path} is not a safetensors file (header length {n} exceeds file size {size})", fix
                )
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidInput(f"{path} is corrupt: its safetensors header is not valid JSON", fix) from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise InvalidInput(
            f"{path} is corrupt: header describes {8 + n + end} bytes but the file has {size} (truncated copy?)", fix
        )


def check_model_folder(folder: Path, ctx: RunContext) -> None:
    cfg = ctx.config.model
    where = f"{cfg.s3.field} (bucket and prefix)" if cfg.s3 else "spec.model.pvc (claimName and path)"
    if not folder.exists():
        raise InvalidInput(
            f"model folder {folder} does not exist",
            f"check {where}: the folder must exist inside the volume "
            "and hold config.json, the weights and the tokenizer",
        )
    if not (folder / "config.json").is_file():
        raise InvalidInput(
            f"model folder {folder} has no config.json",
            f"point {where} at the folder that holds config.json (a Hugging Face model folder)",
        )
    weights = [p for pat in WEIGHT_PATTERNS for p in folder.glob(pat)]
    if not weights:
        raise InvalidInput(
            f"model folder {folder} has no weights (*.safetensors or *.bin)",
            "copy the model's safetensors files into the folder (save_pretrained writes them)",
        )
    for p in folder.glob("*.safetensors"):
        check_safetensors(p)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (folder / s).exists())
        if missing:
            raise InvalidInput(f"model folder {folder} lacks shards {missing} listed in its index", "copy every shard")
    if not any((folder / t).exists() for t in TOKENIZER_FILES):
        raise InvalidInput(
            f"model folder {folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}...)",
            "copy the tokenizer files (tokenizer.json and tokenizer_config.json) from the original model "
            "repository into the folder: calibration and evaluation need them",
        )
    config = json.loads((folder / "config.json").read_text())
    if config.get("auto_map") and not cfg.trust_remote_code:
        raise InvalidConfig(
            f"model {folder.name} ships its own Python code (auto_map in config.json) and trustRemoteCode is false",
            "set spec.model.trustRemoteCode: true if you trust the repository "
            "(the operator policy must allow remote code)",
        )


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


@contextmanager
def hub_errors(m: RunnerModel):
    """Hugging Face Hub failures as RunnerErrors naming the spec field and the fix."""
    from huggingface_hub import errors as hf_errors

    try:
        yield
    except hf_errors.GatedRepoError:
        raise InvalidInput(
            f"{m.hf_repo} is gated and the token cannot read it",
            "accept the model's licence on the Hub with the token's account "
            "and set spec.model.huggingFace.tokenSecretRef",
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise InvalidInput(
            f"{m.hf_repo} does not exist or is private",
            "check the repository id, or set spec.model.huggingFace.tokenSecretRef to a token that can read it",
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise InvalidInput(
            f"revision {m.revision} of {m.hf_repo} does not exist", "fix spec.model.huggingFace.revision"
        ) from None
    except hf_errors.LocalEntryNotFoundError:
        if hub_offline():
            raise InvalidInput(
                f"{m.hf_repo}@{m.revision} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set",
                "pre-load the model into HF_HOME, unset HF_HUB_OFFLINE, or use spec.model.pvc",
            ) from None
        raise TransientError(
            f"cannot reach the Hugging Face Hub for {m.hf_repo}",
            "retried; check the cluster's egress or use spec.model.pvc",
        ) from None
    except hf_errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in {401, 403}:
            raise InvalidInput(
                f"the Hub refused {m.hf_repo} (HTTP {status})",
                "set spec.model.huggingFace.tokenSecretRef to a token with read access",
            ) from None
        raise TransientError(f"Hugging Face Hub error for {m.hf_repo}: {exc}", "retried automatically") from None


def download(ctx: RunContext, local_dir: Path | None = None, revision: str | None = None) -> Path:
    """The model from the Hub: into HF_HOME's cache, or into ``local_dir`` (the shared model cache)."""
    m = ctx.config.model
    from huggingface_hub import snapshot_download

    offline = hub_offline()
    token = os.environ.get("HF_TOKEN") or None
    ctx.reporter.update(message=f"resolving {m.hf_repo}@{m.revision}{' (offline)' if offline else ''}")
    with hub_errors(m):
        path = snapshot_download(
            repo_id=m.hf_repo,
            revision=revision or m.revision,
            token=token,
            local_files_only=offline,
            allow_patterns=DOWNLOAD_PATTERNS,
            local_dir=local_dir,
        )
    return Path(path)


def run(ctx: RunContext) -> None:
    check_config(ctx)
    m = ctx.config.model
    if ctx.config.is_build:
        return  # build stages read the quantize stage's artifacts; see steps/build.py
    if m.path:
        folder = Path(m.path)
    elif m.cache_dir and ctx.stage != modelcache.FETCH_STAGE:
        folder = modelcache.lookup(ctx)  # the fetch stage filled the shared cache
    elif m.s3:
        folder = modelcache.fetch_s3(ctx, modelcache.pod_cache_root())
    elif m.hf_repo:
        folder = download(ctx)
        ctx.metrics["modelRevision"] = folder.name  # huggingface_hub's snapshots/<commit>
    else:
        raise InvalidConfig("the model has no source", "set spec.model.pvc, spec.model.huggingFace or spec.model.s3")
    check_model_folder(folder, ctx)
    if m.path:
        work.start_hashing_model(ctx, folder)
    ctx.paths.model_dir = folder
    ctx.reporter.update(message=f"model at {folder}")
