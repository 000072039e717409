"""GPU architectures, quantization formats, and which architecture can run which format.

This module is the single place that knows the architecture x format matrix (from the
TensorRT-LLM support matrix, https://nvidia.github.io/TensorRT-LLM/reference/support-matrix.html,
and the ModelOpt quantization docs). The CRD's CEL rules, the operator's
scheduling and the runner's pre-flight checks are all generated from it.
"""

from __future__ import annotations

from enum import StrEnum


class GPUArchitecture(StrEnum):
    """GPU architectures that engines are built for (an engine runs only where it was built)."""

    AMPERE = "ampere"
    ADA = "ada"
    HOPPER = "hopper"
    BLACKWELL = "blackwell"


class QuantFormat(StrEnum):
    """Weight/activation quantization formats offered by the API (names follow ModelOpt's)."""

    FP8 = "fp8"
    FP8_BLOCKWISE = "fp8_blockwise"
    INT8_SMOOTHQUANT = "int8_smoothquant"
    INT8_WEIGHT_ONLY = "int8_weight_only"
    INT8 = "int8"
    INT4_AWQ = "int4_awq"
    W4A8_AWQ = "w4a8_awq"
    NVFP4 = "nvfp4"
    NVFP4_AWQ = "nvfp4_awq"
    MXFP4 = "mxfp4"


class KVCacheFormat(StrEnum):
    """Key/value cache quantization for causal language models."""

    NONE = "none"
    FP8 = "fp8"
    NVFP4 = "nvfp4"


class ExportFormat(StrEnum):
    """Checkpoint formats the runner exports after quantization."""

    HF = "hf"  # Hugging Face unified checkpoint (safetensors + hf_quant_config.json)
    TENSORRT_LLM = "tensorrt_llm"  # legacy TensorRT-LLM checkpoint, where ModelOpt still writes it
    ONNX = "onnx"  # ONNX with QuantizeLinear/DequantizeLinear nodes, for encoder models


class ModelTask(StrEnum):
    """What kind of model this is; decides the evaluation metric and the exports that apply."""

    CAUSAL_LM = "causal-lm"
    ENCODER = "encoder"


#: Compute capabilities (major, minor) of each architecture, as GPU feature discovery labels them.
COMPUTE_CAPABILITIES: dict[GPUArchitecture, tuple[tuple[int, int], ...]] = {
    GPUArchitecture.AMPERE: ((8, 0), (8, 6), (8, 7)),
    GPUArchitecture.ADA: ((8, 9),),
    GPUArchitecture.HOPPER: ((9, 0),),
    GPUArchitecture.BLACKWELL: ((10, 0), (10, 3), (12, 0), (12, 1)),
}

_ALL = frozenset(GPUArchitecture)
_ADA_UP = frozenset({GPUArchitecture.ADA, GPUArchitecture.HOPPER, GPUArchitecture.BLACKWELL})

#: Where inference kernels exist for each weight/activation format (TensorRT-LLM support matrix).
FORMAT_ARCHITECTURES: dict[QuantFormat, frozenset[GPUArchitecture]] = {
    QuantFormat.FP8: _ADA_UP,
    QuantFormat.FP8_BLOCKWISE: frozenset({GPUArchitecture.HOPPER, GPUArchitecture.BLACKWELL}),
    QuantFormat.INT8_SMOOTHQUANT: _ALL,
    QuantFormat.INT8_WEIGHT_ONLY: _ALL,
    QuantFormat.INT8: _ALL,
    QuantFormat.INT4_AWQ: frozenset({GPUArchitecture.AMPERE, GPUArchitecture.ADA, GPUArchitecture.HOPPER}),
    QuantFormat.W4A8_AWQ: frozenset({GPUArchitecture.ADA, GPUArchitecture.HOPPER}),
    QuantFormat.NVFP4: frozenset({GPUArchitecture.BLACKWELL}),
    QuantFormat.NVFP4_AWQ: frozenset({GPUArchitecture.BLACKWELL}),
    QuantFormat.MXFP4: frozenset({GPUArchitecture.BLACKWELL}),
}

#: Where each KV cache format has kernels.
KV_CACHE_ARCHITECTURES: dict[KVCacheFormat, frozenset[GPUArchitecture]] = {
    KVCacheFormat.NONE: _ALL,
    KVCacheFormat.FP8: _ALL,
    KVCacheFormat.NVFP4: frozenset({GPUArchitecture.BLACKWELL}),
}

#: ModelOpt preset (attribute of ``modelopt.torch.quantization``) for each format.
MODELOPT_PRESETS: dict[QuantFormat, str] = {
    QuantFormat.FP8: "FP8_DEFAULT_CFG",
    QuantFormat.FP8_BLOCKWISE: "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG",
    QuantFormat.INT8_SMOOTHQUANT: "INT8_SMOOTHQUANT_CFG",
    QuantFormat.INT8_WEIGHT_ONLY: "INT8_WEIGHT_ONLY_CFG",
    QuantFormat.INT8: "INT8_DEFAULT_CFG",
    QuantFormat.INT4_AWQ: "INT4_AWQ_CFG",
    QuantFormat.W4A8_AWQ: "W4A8_AWQ_BETA_CFG",
    QuantFormat.NVFP4: "NVFP4_DEFAULT_CFG",
    QuantFormat.NVFP4_AWQ: "NVFP4_AWQ_LITE_CFG",
    QuantFormat.MXFP4: "MXFP4_DEFAULT_CFG",
}

#: ModelOpt preset that adds KV cache quantization on top of the weight/activation preset.
MODELOPT_KV_PRESETS: dict[KVCacheFormat, str] = {
    KVCacheFormat.FP8: "FP8_KV_CFG",
    KVCacheFormat.NVFP4: "NVFP4_KV_CFG",
}

#: Formats whose fake quantization needs CUDA kernels even for calibration.
CUDA_ONLY_FORMATS: frozenset[QuantFormat] = frozenset({QuantFormat.NVFP4, QuantFormat.NVFP4_AWQ, QuantFormat.MXFP4})

#: Why a format is limited to some architectures, for error messages people can act on.
_FORMAT_NEEDS: dict[QuantFormat, str] = {
    QuantFormat.FP8: "FP8 needs Ada, Hopper or Blackwell GPUs (compute capability 8.9 or newer)",
    QuantFormat.FP8_BLOCKWISE: "FP8 block scaling needs Hopper or Blackwell",
    QuantFormat.INT4_AWQ: "INT4 AWQ kernels exist for Ampere, Ada and Hopper only",
    QuantFormat.W4A8_AWQ: "W4A8 AWQ needs Ada or Hopper",
    QuantFormat.NVFP4: "NVFP4 needs Blackwell",
    QuantFormat.NVFP4_AWQ: "NVFP4 AWQ needs Blackwell",
    QuantFormat.MXFP4: "MXFP4 needs Blackwell",
}
_KV_NEEDS: dict[KVCacheFormat, str] = {
    KVCacheFormat.NVFP4: "an NVFP4 KV cache needs Blackwell",
}


def architecture_of(major: int, minor: int) -> GPUArchitecture | None:
    """The architecture a compute capability belongs to, or None for one we do not target."""
    for arch, capabilities in COMPUTE_CAPABILITIES.items():
        if (major, minor) in capabilities:
            return arch
    return None


def format_supported(fmt: QuantFormat, arch: GPUArchitecture) -> bool:
    return arch in FORMAT_ARCHITECTURES[fmt]


def kv_cache_supported(kv: KVCacheFormat, arch: GPUArchitecture) -> bool:
    return arch in KV_CACHE_ARCHITECTURES[kv]


def format_requirement(fmt: QuantFormat) -> str:
    """One sentence that says where ``fmt`` runs."""
    return _FORMAT_NEEDS.get(fmt, f"{fmt.value} runs on every supported architecture")


def kv_cache_requirement(kv: KVCacheFormat) -> str:
    return _KV_NEEDS.get(kv, f"a {kv.value} KV cache runs on every supported architecture")


def unsupported_reasons(fmt: QuantFormat | None, kv: KVCacheFormat, architectures: list[GPUArchitecture]) -> list[str]:
    """Messages for every (format or KV cache, architecture) pair that has no kernels."""
    reasons = []
    for arch in architectures:
        if fmt is not None and not format_supported(fmt, arch):
            reasons.append(f"{format_requirement(fmt)}; it cannot target {arch.value}")
        if not kv_cache_supported(kv, arch):
            reasons.append(f"{kv_cache_requirement(kv)}; it cannot target {arch.value}")
    return reasons
