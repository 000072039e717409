"""GPU architectures, quantization formats, which architecture can run which format, and which
serving runtime loads which checkpoint.

This module is the single place that knows the architecture x format matrix (from TensorRT-LLM's
hardware support matrix, https://nvidia.github.io/TensorRT-LLM/reference/support-matrix.html, and
the ModelOpt quantization docs) and the serving table (format x KV cache x runtime x minimum
runtime version x architecture, every cell with its source). The CRD's CEL rules, the operator's
checks and scheduling, the runner's pre-flight and post-export checks and the README's serving
table are all generated from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum


class GPUArchitecture(StrEnum):
    """GPU architectures that engines are built for (an engine runs only where it was built)."""

    AMPERE = "ampere"
    ADA = "ada"
    HOPPER = "hopper"
    #: Datacenter Blackwell (B200, B300, GB200, GB300): compute capability 10.x, sm100/sm103.
    BLACKWELL = "blackwell"
    #: RTX and GB10 Blackwell (RTX 50 series, RTX PRO 6000 Blackwell, DGX Spark): compute capability
    #: 12.x, sm120/sm121. Runtimes ship different kernels for it (e.g. no FP8 block scaling).
    BLACKWELL_RTX = "blackwell-rtx"


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
    GPUArchitecture.BLACKWELL: ((10, 0), (10, 3)),
    GPUArchitecture.BLACKWELL_RTX: ((12, 0), (12, 1)),
}

_ALL = frozenset(GPUArchitecture)
_BLACKWELLS = frozenset({GPUArchitecture.BLACKWELL, GPUArchitecture.BLACKWELL_RTX})
_ADA_UP = frozenset({GPUArchitecture.ADA, GPUArchitecture.HOPPER}) | _BLACKWELLS

#: Where inference kernels exist for each weight/activation format (TensorRT-LLM's hardware support
#: matrix, see ``TRTLLM_MATRIX``; INT8 formats run on the TensorRT engine path on every architecture).
FORMAT_ARCHITECTURES: dict[QuantFormat, frozenset[GPUArchitecture]] = {
    QuantFormat.FP8: _ADA_UP,
    QuantFormat.FP8_BLOCKWISE: frozenset({GPUArchitecture.HOPPER, GPUArchitecture.BLACKWELL}),
    QuantFormat.INT8_SMOOTHQUANT: _ALL,
    QuantFormat.INT8_WEIGHT_ONLY: _ALL,
    QuantFormat.INT8: _ALL,
    QuantFormat.INT4_AWQ: frozenset({GPUArchitecture.AMPERE, GPUArchitecture.ADA, GPUArchitecture.HOPPER}),
    QuantFormat.W4A8_AWQ: frozenset({GPUArchitecture.ADA, GPUArchitecture.HOPPER}),
    QuantFormat.NVFP4: _BLACKWELLS,
    QuantFormat.NVFP4_AWQ: _BLACKWELLS,
    QuantFormat.MXFP4: _BLACKWELLS,
}

#: Where each KV cache format has kernels.
KV_CACHE_ARCHITECTURES: dict[KVCacheFormat, frozenset[GPUArchitecture]] = {
    KVCacheFormat.NONE: _ALL,
    KVCacheFormat.FP8: _ALL,
    KVCacheFormat.NVFP4: _BLACKWELLS,
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

#: ModelOpt calibration algorithms whose result over FSDP2 ranks (a multi-pod plan) equals one
#: process's: ``max`` (every quantizer's amax is all-reduced by max over the ranks) and
#: ``smoothquant`` (its smoothing comes from those synced amax values); both give bit-identical
#: checkpoints on 2 CPU ranks (tests/runner/test_ranks.py). The AWQ methods are left out: in
#: ModelOpt 0.47 awq_lite picks each layer's alpha from the rank's own loss
#: (model_calib.py ``update_best_params``, no all-reduce), so ranks can smooth their shards
#: differently (weight scales up to 34% apart from one process's on the tiny Llama).
MULTI_RANK_ALGORITHMS: frozenset[str] = frozenset({"max", "smoothquant"})

#: Formats whose fake quantization needs CUDA kernels even for calibration.
CUDA_ONLY_FORMATS: frozenset[QuantFormat] = frozenset({QuantFormat.NVFP4, QuantFormat.NVFP4_AWQ, QuantFormat.MXFP4})

#: Why a format is limited to some architectures, for error messages people can act on.
_FORMAT_NEEDS: dict[QuantFormat, str] = {
    QuantFormat.FP8: "FP8 needs Ada, Hopper or Blackwell GPUs (compute capability 8.9 or newer)",
    QuantFormat.FP8_BLOCKWISE: "FP8 block scaling needs Hopper or datacenter Blackwell (compute capability 9.0 or "
    "10.x; RTX Blackwell, 12.x, has no kernels for it)",
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


# ------------------------------------------------------------------------------ serving runtimes


class ServingRuntime(StrEnum):
    """Inference servers that load the Hugging Face unified checkpoint (the ``hf`` export)."""

    TENSORRT_LLM = "tensorrt-llm"
    VLLM = "vllm"
    SGLANG = "sglang"


@dataclass(frozen=True)
class Source:
    """Where a table cell comes from: a file of a public repository at a commit."""

    repo: str
    path: str
    commit: str
    what: str  # the part of the file the cell reads

    def cite(self) -> str:
        commit = self.commit[:12] if re.fullmatch(r"[0-9a-f]{40}", self.commit) else self.commit
        return f"{self.repo} `{self.path}` @ {commit}: {self.what}"


_MODELOPT_COMMIT = "a2fbac7bad8ab446d3f8783dadb0c3366eb0ad73"  # 0.47.0dev-81
MODELOPT_EXPORT = Source(
    "NVIDIA/Model-Optimizer",
    "modelopt/torch/export/quant_utils.py",
    _MODELOPT_COMMIT,
    "get_quantization_format and process_layer_quant_config (what hf_quant_config.json says per format)",
)
MODELOPT_DEPLOYMENT = Source(
    "NVIDIA/Model-Optimizer",
    "docs/source/deployment/3_unified_hf.rst",
    _MODELOPT_COMMIT,
    "Minimum Framework Versions: TensorRT-LLM v1.2.0, vLLM v0.10.1, SGLang v0.4.10",
)
TRTLLM_MATRIX = Source(
    "NVIDIA/TensorRT-LLM",
    "docs/source/features/quantization.md",
    "09d4c79ba941a5c2c62c878c3572c0dcc8b85efa",
    "Hardware Support Matrix of the PyTorch backend (no INT8 columns; FP8 block scaling on sm100/103, not sm120)",
)
TRTLLM_LOADER = Source(
    "NVIDIA/TensorRT-LLM",
    "tensorrt_llm/_torch/model_config.py",
    "1a0dc5f70054f66d892df6a964996fc5ead6f81e",
    "load_modelopt_quant_config: QuantAlgo(quant_algo) (no NVFP4_AWQ or plain MXFP4 member), fp8_pb_wo read as "
    "FP8_BLOCK_SCALES, MIXED_PRECISION per layer; KV_CACHE_QUANT_ALGO_LIST = FP8, INT8, NVFP4",
)
VLLM_LOADER = Source(
    "vllm-project/vllm",
    "vllm/model_executor/layers/quantization/modelopt.py",
    "00155cdecca722d98e34234c3d172725b7720b7d",
    "QUANT_ALGOS = FP8, FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO, NVFP4, W4A16_NVFP4, MXFP8, MIXED_PRECISION; "
    "KV_CACHE_QUANT_ALGOS = FP8, NVFP4; get_min_capability 89 (FP8), 75 (NVFP4, Marlin weight-only below 10.0)",
)
VLLM_FP8_VARIANTS = Source(
    "vllm-project/vllm",
    "pull request #30957",
    "merged 2025-12",
    "FP8_PB_WO and FP8_PER_CHANNEL_PER_TOKEN added to QUANT_ALGOS; 0.14.0 is the first release after the merge "
    "(inferred from the date, not read from a release note)",
)
SGLANG_LOADER = Source(
    "sgl-project/sglang",
    "python/sglang/srt/layers/quantization/modelopt_quant.py",
    "003ca3e5152c94c92d88fd43d5eb58e55201e895",
    "ModelOptFp8Config ('FP8' in quant_algo, min capability 89), ModelOptFp4Config (FP8/NVFP4, min capability "
    "100, needs group_size and exclude_modules), KV scales through ModelOptFp8KVCacheMethod only",
)


@dataclass(frozen=True)
class HFQuantization:
    """What ModelOpt's ``export_hf_checkpoint`` writes for a format into ``hf_quant_config.json``."""

    quant_algo: str  # quantization.quant_algo, verbatim (ModelOpt writes some in lower case)
    group_size: int | None = None  # quantization.group_size, where it writes one


#: ``hf_quant_config.json`` per format (``MODELOPT_EXPORT``; tests/runner exports every CPU-capable
#: format and compares, so a ModelOpt upgrade that changes the metadata fails a test).
HF_QUANTIZATION: dict[QuantFormat, HFQuantization] = {
    QuantFormat.FP8: HFQuantization("FP8"),
    QuantFormat.FP8_BLOCKWISE: HFQuantization("fp8_pb_wo"),
    QuantFormat.INT8_SMOOTHQUANT: HFQuantization("W8A8_SQ_PER_CHANNEL"),
    QuantFormat.INT8_WEIGHT_ONLY: HFQuantization("W8A16"),
    QuantFormat.INT8: HFQuantization("W8A8_SQ_PER_CHANNEL"),  # INT8_DEFAULT_CFG quantizes inputs too
    QuantFormat.INT4_AWQ: HFQuantization("W4A16_AWQ", 128),
    QuantFormat.W4A8_AWQ: HFQuantization("W4A8_AWQ", 128),
    QuantFormat.NVFP4: HFQuantization("NVFP4", 16),
    QuantFormat.NVFP4_AWQ: HFQuantization("NVFP4_AWQ", 16),
    QuantFormat.MXFP4: HFQuantization("mxfp4"),
}
#: ``quantization.kv_cache_quant_algo`` per KV cache format (``MODELOPT_EXPORT``).
HF_KV_CACHE: dict[KVCacheFormat, str | None] = {
    KVCacheFormat.NONE: None,
    KVCacheFormat.FP8: "FP8",
    KVCacheFormat.NVFP4: "NVFP4",
}
#: quant_algo of an autoQuantize checkpoint whose layers use more than one format.
MIXED_PRECISION = "MIXED_PRECISION"


@dataclass(frozen=True)
class Cell:
    """A runtime loads one format (or KV cache format) from ``min_version`` on, on these GPUs."""

    min_version: str
    architectures: frozenset[GPUArchitecture]
    source: Source
    quantization: str | None = None  # the runtime's --quantization value for this checkpoint, if it needs one


@dataclass(frozen=True)
class Runtime:
    """One serving runtime's ModelOpt loader, as a row of the serving table."""

    name: ServingRuntime
    title: str
    formats: dict[QuantFormat, Cell]
    kv_caches: dict[KVCacheFormat, Cell]
    mixed_precision: bool  # loads MIXED_PRECISION (autoQuantize) checkpoints
    #: hf_quant_config.json ``quantization`` fields the loader reads without a default, per format
    required_fields: dict[QuantFormat, tuple[str, ...]]
    #: ... and those it refuses when empty
    non_empty_fields: dict[QuantFormat, tuple[str, ...]]
    serve: str  # command template; {path} is the checkpoint folder
    quantization_option: str  # appended with {quantization} when a cell names one

    def serve_command(self, path: str, fmt: QuantFormat | None) -> str:
        command = self.serve.format(path=path)
        cell = self.formats.get(fmt) if fmt else None
        if cell and cell.quantization:
            command += self.quantization_option.format(quantization=cell.quantization)
        return command


_NVFP4_FIELDS = ("group_size", "kv_cache_quant_algo", "exclude_modules")

RUNTIMES: dict[ServingRuntime, Runtime] = {
    ServingRuntime.TENSORRT_LLM: Runtime(
        name=ServingRuntime.TENSORRT_LLM,
        title="TensorRT-LLM",
        formats={
            QuantFormat.FP8: Cell("1.2.0", _ADA_UP, TRTLLM_MATRIX),
            QuantFormat.FP8_BLOCKWISE: Cell(
                "1.2.0", frozenset({GPUArchitecture.HOPPER, GPUArchitecture.BLACKWELL}), TRTLLM_MATRIX
            ),
            QuantFormat.INT4_AWQ: Cell(
                "1.2.0", frozenset({GPUArchitecture.AMPERE, GPUArchitecture.ADA, GPUArchitecture.HOPPER}), TRTLLM_MATRIX
            ),
            QuantFormat.W4A8_AWQ: Cell(
                "1.2.0", frozenset({GPUArchitecture.ADA, GPUArchitecture.HOPPER}), TRTLLM_MATRIX
            ),
            QuantFormat.NVFP4: Cell("1.2.0", _BLACKWELLS, TRTLLM_MATRIX),
        },
        kv_caches={
            KVCacheFormat.FP8: Cell("1.2.0", _ALL, TRTLLM_MATRIX),
            KVCacheFormat.NVFP4: Cell("1.2.0", _BLACKWELLS, TRTLLM_LOADER),
        },
        mixed_precision=True,
        required_fields={},
        non_empty_fields={},
        serve="trtllm-serve {path}",  # reads the quantization from hf_quant_config.json
        quantization_option="",
    ),
    ServingRuntime.VLLM: Runtime(
        name=ServingRuntime.VLLM,
        title="vLLM",
        formats={
            QuantFormat.FP8: Cell("0.10.1", _ADA_UP, VLLM_LOADER, "modelopt"),
            QuantFormat.FP8_BLOCKWISE: Cell("0.14.0", _ADA_UP, VLLM_FP8_VARIANTS, "modelopt"),
            QuantFormat.NVFP4: Cell("0.10.1", _ALL, VLLM_LOADER, "modelopt_fp4"),
        },
        kv_caches={
            KVCacheFormat.FP8: Cell("0.10.1", _ALL, VLLM_LOADER),
            KVCacheFormat.NVFP4: Cell("0.10.1", _BLACKWELLS, VLLM_LOADER),
        },
        mixed_precision=True,
        required_fields={QuantFormat.NVFP4: _NVFP4_FIELDS},
        non_empty_fields={},
        serve="vllm serve {path}",
        quantization_option=" --quantization {quantization}",
    ),
    ServingRuntime.SGLANG: Runtime(
        name=ServingRuntime.SGLANG,
        title="SGLang",
        formats={
            QuantFormat.FP8: Cell("0.4.10", _ADA_UP, SGLANG_LOADER, "modelopt"),
            QuantFormat.NVFP4: Cell("0.4.10", _BLACKWELLS, SGLANG_LOADER, "modelopt_fp4"),
        },
        kv_caches={KVCacheFormat.FP8: Cell("0.4.10", _ALL, SGLANG_LOADER)},
        mixed_precision=False,
        required_fields={QuantFormat.NVFP4: _NVFP4_FIELDS},
        non_empty_fields={QuantFormat.NVFP4: ("group_size", "exclude_modules")},
        serve="python -m sglang.launch_server --model-path {path}",
        quantization_option=" --quantization {quantization}",
    ),
}

_VERSION = re.compile(r"^[0-9]{1,4}[.][0-9]{1,4}([.][0-9]{1,4})?$")  # no backslash: it is CEL too
#: The same check as a CEL/OpenAPI pattern (major.minor[.patch], up to 4 digits each).
VERSION_PATTERN = _VERSION.pattern


def version_key(version: str) -> int:
    """``1.2.3`` -> 100020003: versions compare as integers (the CEL rules compute the same)."""
    parts = [int(p) for p in version.split(".")] + [0]
    return parts[0] * 10**8 + parts[1] * 10**4 + parts[2]


def choices(values: list[str]) -> str:
    """``['a', 'b', 'c']`` -> ``a, b or c``."""
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


def gpus(archs: frozenset[GPUArchitecture]) -> str:
    return choices([a.value for a in GPUArchitecture if a in archs])


#: Refusal messages. ``{runtime}``/``{name}`` are filled per runtime; the other holes are filled
#: with values here and with CEL expressions in the CRD (``qjob_api.v1alpha1``), so the apiserver,
#: the operator and the runner say the same words.
FORMAT_REFUSAL = (
    "{runtime} cannot load {format} checkpoints from ModelOpt: choose {choices}, or remove {name} from "
    "spec.serving.runtimes"
)
VERSION_REFUSAL = (
    "{runtime} loads {format} checkpoints from version {version} on: raise the minVersion of {name} in "
    "spec.serving.runtimes to {version}, or choose another spec.quantization.format"
)
ARCHITECTURE_REFUSAL = (
    "{runtime} runs {format} checkpoints on {gpus} GPUs only: remove the other architectures from "
    "spec.engines, or remove {name} from spec.serving.runtimes"
)
KV_REFUSAL = (
    "{runtime} cannot load the {kv} KV cache of ModelOpt checkpoints: set spec.quantization.kvCache to "
    "{choices}, or remove {name} from spec.serving.runtimes"
)
KV_VERSION_REFUSAL = (
    "{runtime} loads the {kv} KV cache from version {version} on: raise the minVersion of {name} in "
    "spec.serving.runtimes to {version}, or choose another spec.quantization.kvCache"
)
KV_ARCHITECTURE_REFUSAL = (
    "{runtime} runs the {kv} KV cache on {gpus} GPUs only: remove the other architectures from spec.engines, "
    "or remove {name} from spec.serving.runtimes"
)
MIXED_REFUSAL = (
    "{runtime} cannot load mixed-precision (autoQuantize) checkpoints from ModelOpt: set "
    "spec.quantization.format instead, or remove {name} from spec.serving.runtimes"
)
AUTO_FORMAT_REFUSAL = (
    "{runtime} cannot load {format} layers from ModelOpt: keep only {choices} in "
    "spec.quantization.autoQuantize.formats, or remove {name} from spec.serving.runtimes"
)

#: The version and architecture refusals of a format cell and of a KV cache cell.
CELL_REFUSALS = {"format": (VERSION_REFUSAL, ARCHITECTURE_REFUSAL), "kv": (KV_VERSION_REFUSAL, KV_ARCHITECTURE_REFUSAL)}


def runtime_words(rt: Runtime) -> dict[str, str]:
    """The holes every refusal of ``rt`` fills the same way, everywhere."""
    return {
        "runtime": rt.title,
        "name": rt.name.value,
        "choices": choices([f.value for f in QuantFormat if f in rt.formats]),
        "kv_choices": choices([KVCacheFormat.NONE.value] + [k.value for k in KVCacheFormat if k in rt.kv_caches]),
    }


def serving_problems(
    fmt: QuantFormat | None,
    auto_formats: list[QuantFormat],
    kv: KVCacheFormat,
    runtimes: list[tuple[ServingRuntime, str | None]],
    architectures: list[GPUArchitecture],
) -> list[str]:
    """Why the requested runtimes (name, minimum version) cannot load this job's checkpoint."""
    problems = []
    for name, min_version in runtimes:
        rt = RUNTIMES[name]
        words = runtime_words(rt)
        cells = []
        if fmt is not None:
            cells.append(("format", fmt.value, rt.formats.get(fmt), FORMAT_REFUSAL))
        elif not rt.mixed_precision:
            problems.append(MIXED_REFUSAL.format(**words))
        else:
            bad = [f for f in auto_formats if f not in rt.formats]
            if bad:
                problems.append(AUTO_FORMAT_REFUSAL.format(format=bad[0].value, **words))
        if kv != KVCacheFormat.NONE:
            cells.append(("kv", kv.value, rt.kv_caches.get(kv), KV_REFUSAL.replace("{choices}", "{kv_choices}")))
        for hole, value, cell, refusal in cells:
            if cell is None:
                problems.append(refusal.format(**{hole: value}, **words))
                continue
            version_msg, arch_msg = CELL_REFUSALS[hole]
            if min_version and version_key(min_version) < version_key(cell.min_version):
                problems.append(version_msg.format(**{hole: value}, version=cell.min_version, **words))
            if any(a not in cell.architectures for a in architectures):
                problems.append(arch_msg.format(**{hole: value}, gpus=gpus(cell.architectures), **words))
    return problems


def serving_table() -> str:
    """The README's "format -> runtimes -> GPUs" table (``python -m qjob_api.capabilities``)."""

    def cell(c: Cell | None) -> str:
        return f"{c.min_version}+: {', '.join(a.value for a in GPUArchitecture if a in c.architectures)}" if c else "—"

    names = list(RUNTIMES.values())
    lines = [
        "| format | `quant_algo` ModelOpt writes | " + " | ".join(rt.title for rt in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for fmt in QuantFormat:
        hf = HF_QUANTIZATION[fmt]
        lines.append(
            f"| `{fmt.value}` | `{hf.quant_algo}` | " + " | ".join(cell(rt.formats.get(fmt)) for rt in names) + " |"
        )
    for kv in KVCacheFormat:
        if kv != KVCacheFormat.NONE:
            lines.append(
                f"| KV cache `{kv.value}` | `{HF_KV_CACHE[kv]}` | "
                + " | ".join(cell(rt.kv_caches.get(kv)) for rt in names)
                + " |"
            )
    lines.append(
        "| autoQuantize (mixed) | `MIXED_PRECISION` | "
        + " | ".join("every layer format it loads" if rt.mixed_precision else "—" for rt in names)
        + " |"
    )
    sources = sorted(
        {MODELOPT_EXPORT, MODELOPT_DEPLOYMENT}
        | {c.source for rt in names for c in (*rt.formats.values(), *rt.kv_caches.values())},
        key=lambda s: (s.repo, s.path),
    )
    lines += ["", "Sources:", ""] + [f"- {s.cite()}" for s in sources]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(serving_table(), end="")
