"""The QuantizationJob API, version v1alpha1.

These pydantic models are the one source of the API: the CRD schema (descriptions, defaults,
enums, CEL rules) is generated from them (``qjob_api.crd``), the operator parses custom
resources with them, and the runner's config is derived from them. Field descriptions are what
``kubectl explain`` prints, so they are written for the person applying the manifest.
"""

from __future__ import annotations

import re
import string
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator
from pydantic.alias_generators import to_camel

from .capabilities import (
    AUTO_FORMAT_REFUSAL,
    CELL_REFUSALS,
    FORMAT_ARCHITECTURES,
    FORMAT_REFUSAL,
    KV_CACHE_ARCHITECTURES,
    KV_REFUSAL,
    MIXED_REFUSAL,
    RUNTIMES,
    VERSION_PATTERN,
    Cell,
    ExportFormat,
    GPUArchitecture,
    KVCacheFormat,
    ModelTask,
    QuantFormat,
    ServingRuntime,
    format_requirement,
    gpus,
    kv_cache_requirement,
    runtime_words,
    serving_problems,
    version_key,
)

GROUP = "qjob.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "QuantizationJob"
PLURAL = "quantizationjobs"
SINGULAR = "quantizationjob"
SHORT_NAMES = ["qjob", "qjobs"]

_QUANTITY = r"^[0-9]{1,12}(\.[0-9]{1,6})?(Ki|Mi|Gi|Ti|k|M|G|T)?$"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# Kubernetes' own limits (k8s.io/apimachinery/pkg/util/validation): what a Job or Pod would refuse
# is refused when the QuantizationJob is applied, never by a Job create the operator retries.
_LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
_QUALIFIED_NAME = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_CONFIG_KEY = r"^[-._a-zA-Z0-9]+$"
#: metadata.name is a label value on every child (`qjob.dev/job-name`): at most 63 characters.
NAME_MAX_LENGTH = 63
#: Longest qualified name: a 253-character DNS prefix, '/', a 63-character name.
QUALIFIED_NAME_MAX_LENGTH = 317
#: One year: deadlines and TTLs beyond it are mistakes, and unbounded integers overflow timers.
MAX_SECONDS = 31_536_000
#: Pod label keys the Job controller, Kueue or the operator own: a spec that sets them would be
#: refused by the Job's validation (selector mismatch) or would confuse the operator.
RESERVED_LABEL_PREFIXES = ("qjob.dev/", "batch.kubernetes.io/", "kueue.x-k8s.io/")
RESERVED_LABEL_KEYS = ("controller-uid", "job-name")

LabelValue = Annotated[str, StringConstraints(max_length=63, pattern=_LABEL_VALUE)]


def cel(rule: str, message: str, **extra: str) -> dict[str, str]:
    """One ``x-kubernetes-validations`` entry."""
    return {"rule": rule, "message": message, **extra}


def cel_rules(*rules: dict[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


def is_qualified_name(key: str) -> bool:
    """A label or annotation key as Kubernetes validates it (prefix at most 253 characters)."""
    return bool(re.fullmatch(_QUALIFIED_NAME, key)) and ("/" not in key or key.index("/") <= 253)


def _keys_rule(field: str, what: str) -> dict[str, str]:
    return cel(
        f"self.all(k, size(k) <= {QUALIFIED_NAME_MAX_LENGTH} && (!k.contains('/') || k.indexOf('/') <= 253) && "
        f"k.matches(r'{_QUALIFIED_NAME}'))",
        f"{field} keys must be {what} keys: an optional DNS prefix (at most 253 characters) and '/', then at "
        "most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
    )


def _check_keys(field: str, mapping: dict[str, str], reserved: bool = False) -> dict[str, str]:
    bad = [k for k in mapping if not is_qualified_name(k)]
    if bad:
        raise ValueError(f"{field} has invalid keys {bad[:3]}: use label-style keys such as example.com/team")
    if reserved:
        taken = [k for k in mapping if k in RESERVED_LABEL_KEYS or k.startswith(RESERVED_LABEL_PREFIXES)]
        if taken:
            raise ValueError(f"{field} sets {taken[:3]}, which the Job controller, Kueue or the operator own")
    return mapping


class APIModel(BaseModel):
    """Base for API types: camelCase on the wire; unknown fields are ignored (the apiserver prunes
    them from QuantizationJobs first: the CRD schema is structural)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", use_enum_values=False)

    def to_api(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# ---------------------------------------------------------------------------------------- model


def _relative_rule(field: str, root: str) -> dict[str, str]:
    return cel(
        "!self.startsWith('/') && !self.split('/').exists(p, p == '..')",
        f"{field} must be relative to {root}: drop the leading '/' and any '..'",
    )


def _check_relative(value: str, field: str, root: str) -> str:
    if value.startswith("/") or ".." in value.split("/"):
        raise ValueError(f"{field} must be relative to {root}: drop the leading '/' and any '..'")
    return value


class SecretKeyRef(APIModel):
    """A key in a Secret in the job's namespace."""

    name: str = Field(
        description="Name of the Secret in the QuantizationJob's namespace.", pattern=_DNS_SUBDOMAIN, max_length=253
    )
    key: str = Field(
        "token", description="Key inside the Secret that holds the value.", pattern=_CONFIG_KEY, max_length=253
    )


class HuggingFaceModel(APIModel):
    """A model repository on the Hugging Face Hub (or a mirror the runner is pointed at)."""

    repo: str = Field(
        description="Repository id, for example `meta-llama/Llama-3.1-8B-Instruct`.",
        pattern=r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$",
        max_length=200,
    )
    revision: str = Field(
        "main",
        description="Branch, tag or commit to download. Pin a commit for reproducible artifacts.",
        pattern=r"^[\w./-]+$",
        max_length=255,
    )
    token_secret_ref: SecretKeyRef | None = Field(
        None,
        description="Secret holding a Hugging Face access token, for gated or private models. "
        "Only this Secret is mounted into the runner pod.",
    )


class PVCLocation(APIModel):
    """A path inside a PersistentVolumeClaim in the job's namespace."""

    claim_name: str = Field(description="Name of the PersistentVolumeClaim.", pattern=_DNS_SUBDOMAIN, max_length=253)
    path: str = Field(
        "",
        description="Path inside the volume, relative to its root (no leading `/`, no `..`). Empty means the root.",
        max_length=1024,
        json_schema_extra=cel_rules(_relative_rule("path", "the volume root")),
    )

    @field_validator("path")
    @classmethod
    def _relative(cls, path: str) -> str:
        return _check_relative(path, "path", "the volume root")


class LocalObjectRef(APIModel):
    """An object in the job's namespace, by name."""

    name: str = Field(description="Name of the object in the QuantizationJob's namespace.", max_length=253)


class ConfigMapKeyRef(APIModel):
    """A key in a ConfigMap in the job's namespace."""

    name: str = Field(description="ConfigMap name in the job's namespace.", max_length=253)
    key: str = Field(description="Key inside the ConfigMap.", max_length=253)


class S3Location(APIModel):
    """A bucket and key prefix on Amazon S3 or an S3-compatible store (Ceph RGW, versitygw, ...)."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel(
                "!(has(self.insecure) && self.insecure && has(self.caBundle))",
                "insecure skips TLS verification, caBundle configures it: set only one of them",
            )
        )
    )

    endpoint: str | None = Field(
        None,
        description="Endpoint URL, e.g. `https://s3.eu-west-1.amazonaws.com` or `http://rgw.storage.svc:8080`. "
        "Empty: Amazon S3 for `region`.",
        pattern=r"^https?://[^\s/]+(/.*)?$",
        max_length=512,
    )
    region: str = Field("us-east-1", description="Region the bucket lives in (signs the requests).", max_length=64)
    bucket: str = Field(
        description="Bucket name (3 to 63 lowercase letters, digits, dots and hyphens).",
        pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$",
        max_length=63,
    )
    prefix: str = Field(
        "",
        description="Key prefix (a folder) inside the bucket, without a leading `/`.",
        max_length=1024,
        json_schema_extra=cel_rules(_relative_rule("prefix", "the bucket")),
    )
    credentials_secret_ref: LocalObjectRef | None = Field(
        None,
        description="Secret with keys `accessKeyId` and `secretAccessKey`, passed to the runner as environment "
        "variables. Empty: the pod's own identity (e.g. IRSA, instance profile).",
    )
    insecure: bool = Field(False, description="Skip TLS certificate verification (test stores only).")
    ca_bundle: ConfigMapKeyRef | None = Field(
        None, description="ConfigMap key holding the PEM CA bundle that signed the endpoint's certificate."
    )

    @field_validator("prefix")
    @classmethod
    def _relative(cls, prefix: str) -> str:
        return _check_relative(prefix, "prefix", "the bucket")


class ModelSpec(APIModel):
    """The model to quantize. Set exactly one source: `huggingFace`, `pvc` or `s3`."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel(
                "[has(self.huggingFace), has(self.pvc), has(self.s3)].filter(x, x).size() == 1",
                "set exactly one model source: spec.model.huggingFace, spec.model.pvc or spec.model.s3",
            ),
            cel(
                "!has(self.cacheClaimName) || !has(self.pvc)",
                "a model on a PVC is read in place: remove spec.model.cacheClaimName",
                fieldPath=".cacheClaimName",
            ),
        )
    )

    hugging_face: HuggingFaceModel | None = Field(None, description="Download the model from the Hugging Face Hub.")
    pvc: PVCLocation | None = Field(
        None,
        description="Read the model from a folder in a PersistentVolumeClaim (config.json, "
        "safetensors weights and tokenizer files). Use this for air-gapped clusters.",
    )
    s3: S3Location | None = Field(
        None,
        description="Download the model folder (config.json, safetensors weights, tokenizer files) from the "
        "objects under `prefix` in an S3 bucket. Downloads are cached by the objects' ETags.",
    )
    cache_claim_name: str | None = Field(
        None,
        pattern=_DNS_SUBDOMAIN,
        max_length=253,
        description="PersistentVolumeClaim (ReadWriteMany) in this namespace holding the shared model cache. A "
        "fetch stage without GPUs downloads a Hugging Face or S3 model into it once per source and resolved "
        "revision (commit, or object ETags); GPU stages mount it read-only and download nothing. Default: the "
        "operator's cache shared across namespaces when its policy covers this namespace and this model's source "
        "(fetched with the platform's credentials; never for a model read with your own tokenSecretRef), else "
        "the operator's modelCache.claimName; none: the quantize pod downloads the model itself.",
    )
    task: ModelTask = Field(
        ModelTask.CAUSAL_LM,
        description="`causal-lm` for decoder language models (evaluated by perplexity, exported as "
        "Hugging Face/TensorRT-LLM checkpoints); `encoder` for BERT-style encoders (evaluated by "
        "embedding similarity, exported to ONNX for TensorRT).",
    )
    trust_remote_code: bool = Field(
        False,
        description="Run Python code shipped with the model repository. Refused unless the operator's "
        "policy allows remote code.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Data type to load the unquantized weights in. `auto` uses the checkpoint's."
    )


# --------------------------------------------------------------------------------- quantization


class AutoQuantizeSpec(APIModel):
    """Per-layer format search (ModelOpt AutoQuantize) under an effective-bits budget."""

    effective_bits: float = Field(
        description="Average bits per weight the search may spend, for example 4.8.", ge=2.0, le=16.0
    )
    formats: list[QuantFormat] = Field(
        description="Candidate formats the search chooses between, per layer.",
        min_length=1,
        max_length=6,
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )


class QuantizationSpec(APIModel):
    """How to quantize. Set `format`, or `autoQuantize` to let ModelOpt choose per layer."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel(
                "has(self.format) != has(self.autoQuantize)",
                "set exactly one of spec.quantization.format or spec.quantization.autoQuantize",
            )
        )
    )

    format: QuantFormat | None = Field(
        None,
        description="Weight/activation format, mapped to a ModelOpt preset: fp8 (FP8_DEFAULT_CFG), "
        "fp8_blockwise, int8 (INT8_DEFAULT_CFG), int8_smoothquant, int8_weight_only, int4_awq, "
        "w4a8_awq (W4A8_AWQ_BETA_CFG), nvfp4, nvfp4_awq, mxfp4. NVFP4 and MXFP4 run on Blackwell only; "
        "W4A8 on Ada and Hopper; INT4 AWQ on Ampere, Ada and Hopper; FP8 block scaling on Hopper and "
        "datacenter Blackwell. Which serving runtimes load each format: spec.serving.",
    )
    kv_cache: KVCacheFormat = Field(
        KVCacheFormat.NONE,
        description="KV cache quantization for causal LMs: none, fp8 (all architectures), nvfp4 (Blackwell only; "
        "SGLang cannot load it).",
    )
    algorithm: Literal["max", "smoothquant", "awq_lite", "awq_clip", "awq_full"] | None = Field(
        None, description="Override the calibration algorithm of the preset (ModelOpt `algorithm`)."
    )
    auto_quantize: AutoQuantizeSpec | None = Field(
        None, description="Search per-layer formats under an effective-bits budget instead of one format."
    )
    exclude_modules: list[Annotated[str, StringConstraints(max_length=256, pattern=r"^[\w.*?\[\]!-]+$")]] = Field(
        default=[],
        description="Module name patterns (fnmatch wildcards, e.g. `*lm_head*`) left unquantized.",
        max_length=64,
    )


# ---------------------------------------------------------------------------------- calibration


class HuggingFaceDataset(APIModel):
    """A dataset on the Hugging Face Hub. With a model cache the fetch stage (no GPU) streams the
    samples the job needs into the cache once per resolved commit; otherwise the quantize pod
    streams them itself."""

    name: str = Field(
        description="Dataset id, for example `cnn_dailymail` or `nvidia/Nemotron-PrismMath`.",
        pattern=r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$",
        max_length=200,
    )
    revision: str = Field(
        "main",
        description="Branch, tag or commit of the dataset repository; resolved to its commit (part of the cache "
        "entry). Pin a commit for reproducible calibration.",
        pattern=r"^[\w./-]+$",
        max_length=255,
    )
    config: str | None = Field(None, description="Dataset configuration name, if it has several.", max_length=200)
    split: str = Field("train", description="Split to sample from, e.g. `train` or `train[:10%]`.", max_length=200)
    text_field: str = Field("text", description="Column that holds the text.", max_length=200)


class ConfigMapText(APIModel):
    """Calibration text kept in a ConfigMap (small sets, air-gapped clusters)."""

    name: str = Field(description="ConfigMap name in the job's namespace.", pattern=_DNS_SUBDOMAIN, max_length=253)
    key: str = Field(
        description="Key holding the text: JSON Lines with a `text` field, or plain text.",
        pattern=r"^[-_a-zA-Z0-9][-._a-zA-Z0-9]*$",
        max_length=253,
    )


class DatasetSpec(APIModel):
    """Where calibration text comes from. Set exactly one source."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel(
                "[has(self.huggingFace), has(self.pvc), has(self.configMap)].filter(x, x).size() == 1",
                "set exactly one calibration dataset source: huggingFace, pvc or configMap",
            )
        )
    )

    hugging_face: HuggingFaceDataset | None = Field(None, description="A Hugging Face Hub dataset.")
    pvc: PVCLocation | None = Field(
        None, description="A `.jsonl` file (one JSON object with a `text` field a line) or a `.txt` file."
    )
    config_map: ConfigMapText | None = Field(None, description="Text stored in a ConfigMap key.")


class CalibrationSpec(APIModel):
    """Calibration data and its shape. ModelOpt recommends 512 to 1024 samples."""

    dataset: DatasetSpec = Field(description="Where the calibration text comes from.")
    samples: int = Field(512, ge=1, le=65536, description="Number of calibration samples.")
    sequence_length: int = Field(512, ge=16, le=131072, description="Tokens per sample (truncated or packed).")
    batch_size: int = Field(
        0, ge=0, le=1024, description="Samples per forward pass. 0 probes the largest batch that fits in GPU memory."
    )
    layerwise: bool = Field(
        False,
        description="Calibrate one decoder layer at a time (ModelOpt layer-wise calibration) with a checkpoint "
        "per layer on the output volume, so a preempted attempt resumes at the last finished layer. The "
        "operator also turns it on when re-planning after an out-of-memory failure.",
    )


# --------------------------------------------------------------------------------------- export


class ExportSpec(APIModel):
    """Checkpoint formats written after quantization."""

    formats: list[ExportFormat] = Field(
        default=[ExportFormat.HF],
        min_length=1,
        max_length=3,
        description="`hf`: Hugging Face unified checkpoint (safetensors + hf_quant_config.json); which serving "
        "runtimes load it depends on the format (TensorRT-LLM loads the most, vLLM and SGLang FP8 and NVFP4): "
        "list yours in spec.serving.runtimes, and each artifact lists the runtimes that load it. "
        "`tensorrt_llm`: legacy TensorRT-LLM checkpoint (causal LMs); `onnx`: ONNX with Q/DQ nodes "
        "(encoders), the input to TensorRT engine builds.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="Tensor parallel ranks of a tensorrt_llm checkpoint.")
    pipeline_parallel_size: int = Field(
        1, ge=1, le=64, description="Pipeline parallel ranks of a tensorrt_llm checkpoint."
    )
    onnx_opset: int = Field(20, ge=17, le=23, description="ONNX opset for the onnx export (FP8 Q/DQ needs 19+).")


class EngineTarget(APIModel):
    """An engine build on a GPU of one architecture. Engines only run on the architecture (and
    TensorRT version) that built them, so each target builds on a node of that architecture."""

    architecture: GPUArchitecture = Field(
        description="GPU architecture to build on and for: ampere (8.0, 8.6, 8.7), ada (8.9), hopper (9.0), "
        "blackwell (datacenter Blackwell: B200, B300, GB200, GB300; 10.0, 10.3) or blackwell-rtx (RTX and GB10 "
        "Blackwell: RTX 50 series, RTX PRO 6000, DGX Spark; 12.0, 12.1). The two Blackwells run different kernels."
    )
    max_batch_size: int = Field(8, ge=1, le=4096, description="Largest batch the engine serves.")
    max_sequence_length: int = Field(2048, ge=16, le=131072, description="Longest input plus output, in tokens.")
    optimization_level: int = Field(
        3, ge=0, le=5, description="TensorRT builder optimization level (0 fastest build, 5 fastest engine)."
    )


# -------------------------------------------------------------------------------------- serving

_VERSION_MESSAGE = (
    "spec.serving.runtimes[].minVersion must be a version like 0.10.1 or 1.2 (major.minor[.patch], up to 4 digits each)"
)


class RuntimeRequirement(APIModel):
    """A serving runtime that must load the `hf` checkpoint."""

    name: ServingRuntime = Field(
        description="`tensorrt-llm` (trtllm-serve, PyTorch backend), `vllm` or `sglang`.",
    )
    min_version: str | None = Field(
        None,
        max_length=14,
        description="Oldest version of this runtime you serve with, e.g. `0.10.1`. A format or KV cache it "
        "loads only from a newer version is refused. Empty: a current release.",
        json_schema_extra=cel_rules(cel(f"self.matches('{VERSION_PATTERN}')", _VERSION_MESSAGE)),
    )

    @field_validator("min_version")
    @classmethod
    def _version(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(VERSION_PATTERN, value):
            raise ValueError(_VERSION_MESSAGE)
        return value


class ServingSpec(APIModel):
    """Inference servers that will load the checkpoint. A job is refused at apply when one of them
    cannot load its format, KV cache or engine architectures, and the runner checks the exported
    checkpoint's hf_quant_config.json against each before it publishes anything."""

    runtimes: list[RuntimeRequirement] = Field(
        default=[],
        max_length=3,
        description="Runtimes the hf checkpoint must load in, each with an optional minimum version. "
        "Empty: no constraint (every checkpoint artifact still lists the runtimes that load it, with a "
        "serve command).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )


def serving_refusals(
    quantization: QuantizationSpec, serving: ServingSpec, architectures: list[GPUArchitecture]
) -> list[str]:
    """The CRD's serving rules, in Python (the operator and the runner check them too)."""
    q = quantization
    return serving_problems(
        q.format,
        list(q.auto_quantize.formats) if q.auto_quantize else [],
        q.kv_cache,
        [(r.name, r.min_version) for r in serving.runtimes],
        architectures,
    )


# ----------------------------------------------------------------------------------- evaluation


class QualityGate(APIModel):
    """Limits on quality loss; the job fails with reason QualityGateFailed when one is exceeded."""

    max_perplexity_increase: float | None = Field(
        None, ge=0, description="Largest allowed relative perplexity increase, e.g. 0.05 for +5% (causal LMs)."
    )
    min_cosine_similarity: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="Smallest allowed mean cosine similarity of outputs to the unquantized model (encoders).",
    )


class EvaluationSpec(APIModel):
    """Quality measured on held-out text, before and after quantization."""

    enabled: bool = Field(True, description="Measure quality. Disable only to save time on very large models.")
    samples: int = Field(64, ge=1, le=4096, description="Held-out samples (never used for calibration).")
    gate: QualityGate | None = Field(None, description="Fail the job when quality drops more than this.")


# ------------------------------------------------------------------------ resources & scheduling


def _int_or_string(schema: dict[str, Any]) -> None:
    """A Kubernetes quantity: a number (`cpu: 4`) or a string (`cpu: "4"`, `3500m`), as in a pod."""
    schema.pop("type", None)
    schema["x-kubernetes-int-or-string"] = True
    # pattern and maxLength check strings only: bound a number the same way.
    schema["x-kubernetes-validations"] = [
        cel(
            "type(self) != int || (self >= 0 && self <= 999999999999)",
            "a quantity given as a number must be between 0 and 999999999999: use a string such as 64Gi",
        )
    ]


class ResourcesSpec(APIModel):
    """What each runner pod asks for."""

    gpus: int = Field(
        1,
        ge=0,
        le=8,
        description="GPUs per pod; the model is spread across them when it does not fit on one. 0 (auto): the "
        "operator reads the model's size from its safetensors headers (in the fetch stage, else a short `inspect` "
        "pod without GPUs) and "
        "plans GPUs per pod and pods for the quantize stage from the GPU memory of the nodes that can run it "
        "(status.plans shows the plan and its numbers); a plan larger than one node runs as several pods with "
        "torchrun. Build stages use 1 GPU when auto.",
    )
    min_gpu_memory: str | None = Field(
        None,
        pattern=_QUANTITY,
        max_length=24,
        description="Smallest GPU memory per GPU, e.g. `40Gi`; matched against the `nvidia.com/gpu.memory` node label.",
    )
    cpu: str = Field(
        "4",
        pattern=_QUANTITY.replace("(Ki|Mi|Gi|Ti|k|M|G|T)", "(m|k|M|G)"),
        max_length=24,
        description='CPU request per pod: `4`, `"4"` or `3500m`.',
        json_schema_extra=_int_or_string,
    )
    memory: str = Field(
        "32Gi",
        pattern=_QUANTITY,
        max_length=24,
        description="Memory request and limit per pod.",
        json_schema_extra=_int_or_string,
    )
    scratch_storage: str | None = Field(
        None,
        pattern=_QUANTITY,
        max_length=24,
        description="Size limit of each GPU pod's scratch volume (model downloads without a fetch stage, S3 "
        "output staging), requested as ephemeral-storage together with /tmp. Default: the staged artifacts' "
        "size estimated from the model's weight bytes when the fetch stage measured them, else the "
        "operator's runner.scratchSize.",
    )

    @field_validator("cpu", "memory", mode="before")
    @classmethod
    def _quantity_number(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class Toleration(APIModel):
    """A Kubernetes toleration (see `kubectl explain pod.spec.tolerations`)."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel(
                "self.operator != 'Exists' || !has(self.value) || self.value == ''",
                "a toleration with operator Exists matches any value: remove its value",
            ),
            cel(
                "self.operator == 'Exists' || (has(self.key) && self.key != '')",
                "a toleration without a key must use operator Exists",
            ),
            cel(
                "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
                "tolerationSeconds applies to NoExecute taints only: set effect to NoExecute or drop it",
            ),
        )
    )

    key: str | None = Field(
        None,
        description="Taint key to tolerate; empty with operator Exists matches all.",
        pattern=_QUALIFIED_NAME,
        max_length=QUALIFIED_NAME_MAX_LENGTH,
    )
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal.")
    value: str | None = Field(
        None, description="Taint value to match with operator Equal.", pattern=_LABEL_VALUE, max_length=63
    )
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        None, ge=0, le=MAX_SECONDS, description="How long a NoExecute taint is tolerated."
    )

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator Exists matches any value: remove its value")
        if self.operator != "Exists" and not self.key:
            raise ValueError("a toleration without a key must use operator Exists")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds applies to NoExecute taints only: set effect to NoExecute or drop it")
        return self


class SchedulingSpec(APIModel):
    """Placement overrides added to what the operator derives from the architectures."""

    node_selector: dict[str, LabelValue] = Field(
        default={},
        max_length=16,
        description="Extra node labels every runner pod requires (at most 16).",
        json_schema_extra=cel_rules(_keys_rule("spec.scheduling.nodeSelector", "label")),
    )
    tolerations: list[Toleration] = Field(
        default=[], max_length=16, description="Tolerations for GPU node taints (at most 16)."
    )
    priority_class_name: str | None = Field(
        None,
        description="PriorityClass of the runner pods; it must exist (the job fails with PriorityClassNotFound).",
        pattern=_DNS_SUBDOMAIN,
        max_length=253,
    )
    queue_name: str | None = Field(
        None,
        description="Kueue LocalQueue: sets `kueue.x-k8s.io/queue-name` on the runner Jobs so Kueue admits them.",
        pattern=_LABEL_VALUE,
        max_length=63,
    )
    pod_labels: dict[str, LabelValue] = Field(
        default={},
        max_length=32,
        description="Extra labels on runner pods (at most 32; keys under qjob.dev/, batch.kubernetes.io/ and "
        "kueue.x-k8s.io/, and job-name and controller-uid, are the operator's, the Job controller's and Kueue's).",
        json_schema_extra=cel_rules(
            _keys_rule("spec.scheduling.podLabels", "label"),
            cel(
                "self.all(k, !(k in ["
                + ", ".join(f"'{k}'" for k in RESERVED_LABEL_KEYS)
                + "]) && "
                + " && ".join(f"!k.startsWith('{p}')" for p in RESERVED_LABEL_PREFIXES)
                + ")",
                "spec.scheduling.podLabels must not set keys under "
                + ", ".join(RESERVED_LABEL_PREFIXES)
                + " or "
                + ", ".join(RESERVED_LABEL_KEYS)
                + ": the operator, the Job controller and Kueue set those",
            ),
        ),
    )
    pod_annotations: dict[str, Annotated[str, StringConstraints(max_length=512)]] = Field(
        default={},
        max_length=8,
        description="Extra annotations on runner pods, e.g. for a service mesh or cost tracking (at most 8, "
        "values up to 512 characters).",
        json_schema_extra=cel_rules(_keys_rule("spec.scheduling.podAnnotations", "annotation")),
    )
    calibration_architecture: GPUArchitecture | None = Field(
        None,
        description="Architecture to calibrate on. By default any GPU node that fits (calibration is "
        "simulated quantization and runs on any CUDA GPU).",
    )

    @field_validator("node_selector", "pod_annotations")
    @classmethod
    def _keys(cls, mapping: dict[str, str], info) -> dict[str, str]:
        return _check_keys(f"spec.scheduling.{to_camel(info.field_name)}", mapping)

    @field_validator("pod_labels")
    @classmethod
    def _label_keys(cls, mapping: dict[str, str]) -> dict[str, str]:
        return _check_keys("spec.scheduling.podLabels", mapping, reserved=True)


class OutputSpec(APIModel):
    """Where artifacts are written: set exactly one of `pvc` or `s3`. A job's artifacts appear only
    once complete: `manifest.json` is written last, and its presence means the output is complete."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel("has(self.pvc) != has(self.s3)", "set exactly one output: spec.output.pvc or spec.output.s3")
        )
    )

    pvc: PVCLocation | None = Field(
        None, description="PersistentVolumeClaim and folder for artifacts. Empty path means `<namespace>/<name>`."
    )
    s3: S3Location | None = Field(
        None,
        description="S3 bucket and key prefix for artifacts, uploaded in parallel multipart parts with "
        "`manifest.json` last. Empty prefix means `<namespace>/<name>`.",
    )


class RunPolicy(APIModel):
    """Retries, deadlines and clean-up. These are the only spec fields that may change after creation."""

    backoff_limit: int = Field(
        2, ge=0, le=20, description="Retries of a failed stage (transient errors and OOM; bad input is never retried)."
    )
    active_deadline_seconds: int | None = Field(
        None,
        ge=1,
        le=MAX_SECONDS,
        description="Fail a stage whose Job has been active longer than this (reason DeadlineExceeded).",
    )
    pending_deadline_seconds: int = Field(
        600,
        ge=0,
        le=MAX_SECONDS,
        description="Fail the job when a stage waits longer than this for a node (no capacity, no matching node).",
    )
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        le=MAX_SECONDS,
        description="Delete the QuantizationJob (and its children) this long after it finished. Artifacts stay.",
    )
    suspend: bool = Field(False, description="Create no new pods while true (Kueue also uses this).")


class ReusePolicy(StrEnum):
    """Whether a job may complete with the verified artifacts of an identical finished job."""

    IF_AVAILABLE = "IfAvailable"
    NEVER = "Never"


# ------------------------------------------------------------------------------------------ spec


def _matrix_rules() -> list[dict[str, str]]:
    """CEL rules refusing engine targets whose architecture has no kernels for the format."""
    rules = []
    for fmt, archs in FORMAT_ARCHITECTURES.items():
        if archs == frozenset(GPUArchitecture):
            continue
        allowed = ", ".join(f"'{a.value}'" for a in GPUArchitecture if a in archs)
        rules.append(
            cel(
                f"!has(self.quantization.format) || self.quantization.format != '{fmt.value}' || "
                f"self.engines.all(e, e.architecture in [{allowed}])",
                f"{format_requirement(fmt)}: remove the other architectures from spec.engines "
                f"or choose another spec.quantization.format",
                fieldPath=".engines",
            )
        )
    for kv, archs in KV_CACHE_ARCHITECTURES.items():
        if archs == frozenset(GPUArchitecture):
            continue
        allowed = ", ".join(f"'{a.value}'" for a in GPUArchitecture if a in archs)
        rules.append(
            cel(
                f"self.quantization.kvCache != '{kv.value}' || self.engines.all(e, e.architecture in [{allowed}])",
                f"{kv_cache_requirement(kv)[0].upper()}{kv_cache_requirement(kv)[1:]}: remove the other "
                "architectures from spec.engines or choose another spec.quantization.kvCache",
                fieldPath=".engines",
            )
        )
    matrix = ", ".join(
        f"'{fmt.value}': [{', '.join(repr(a.value) for a in GPUArchitecture if a in archs)}]"
        for fmt, archs in FORMAT_ARCHITECTURES.items()
    )
    rules.append(
        cel(
            "!has(self.quantization.autoQuantize) || self.quantization.autoQuantize.formats.all(f, "
            f"self.engines.all(e, e.architecture in {{{matrix}}}[f]))",
            "every spec.quantization.autoQuantize.formats candidate must run on every architecture in "
            "spec.engines (NVFP4/MXFP4: Blackwell only; W4A8: Ada, Hopper; INT4 AWQ: Ampere, Ada, Hopper)",
            fieldPath=".quantization.autoQuantize.formats",
        )
    )
    return rules


def _cel_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _cel_message(template: str, words: dict[str, str], **expressions: str) -> str:
    """A CEL ``messageExpression`` for a refusal template of ``qjob_api.capabilities``: the holes in
    ``expressions`` become CEL expressions, the others the runtime's fixed words."""
    parts: list[str] = []
    text = ""  # literal text not yet emitted
    for literal, hole, _, _ in string.Formatter().parse(template):
        text += literal
        if hole in expressions:
            parts += [_cel_string(text), expressions[hole]] if text else [expressions[hole]]
            text = ""
        elif hole is not None:
            text += words[hole]
    return " + ".join(parts + ([_cel_string(text)] if text else []))


def _cel_version(expr: str) -> str:
    """``qjob_api.capabilities.version_key`` in CEL."""
    part = f"{expr}.split('.')"
    return f"int({part}[0]) * 100000000 + int({part}[1]) * 10000 + (size({part}) > 2 ? int({part}[2]) : 0)"


def _cel_map(values: dict[str, str]) -> str:
    return "{" + ", ".join(f"{_cel_string(k)}: {v}" for k, v in values.items()) + "}"


def _cel_list(values: list[str]) -> str:
    return "[" + ", ".join(_cel_string(v) for v in values) + "]"


def _fallback(words: dict[str, str]) -> str:
    """``message`` of a serving rule, shown only if its messageExpression cannot be evaluated."""
    return (
        f"{words['runtime']} cannot load the checkpoint this spec asks for (see the serving table in the "
        f"README): change spec.quantization or spec.engines, or remove {words['name']} from spec.serving.runtimes"
    )


def _cell_rules(
    asks: str, value: str, cells: dict[str, Cell], words: dict[str, str], hole: str
) -> list[dict[str, str]]:
    """Minimum-version and architecture rules of one runtime for the format (or KV cache) in ``value``."""
    version_msg, arch_msg = CELL_REFUSALS[hole]
    keys = _cel_map({k: str(version_key(c.min_version)) for k, c in cells.items()})
    versions = _cel_map({k: _cel_string(c.min_version) for k, c in cells.items()})
    archs = _cel_map(
        {k: _cel_list([a.value for a in GPUArchitecture if a in c.architectures]) for k, c in cells.items()}
    )
    names = _cel_map({k: _cel_string(gpus(c.architectures)) for k, c in cells.items()})
    name = words["name"]
    return [
        cel(
            f"!({value} in {keys}) || self.serving.runtimes.all(x, x.name != '{name}' || !has(x.minVersion) || "
            f"!x.minVersion.matches('{VERSION_PATTERN}') || {_cel_version('x.minVersion')} >= {keys}[{value}])",
            _fallback(words),
            messageExpression=_cel_message(version_msg, words, **{hole: value, "version": f"{versions}[{value}]"}),
            fieldPath=".serving.runtimes",
        ),
        cel(
            f"!({value} in {archs}) || !{asks} || self.engines.all(e, e.architecture in {archs}[{value}])",
            _fallback(words),
            messageExpression=_cel_message(arch_msg, words, **{hole: value, "gpus": f"{names}[{value}]"}),
            fieldPath=".engines",
        ),
    ]


def _serving_rules() -> list[dict[str, str]]:
    """CEL rules refusing serving runtimes that cannot load the job's checkpoint (the serving table)."""
    fmt, kv = "self.quantization.format", "self.quantization.kvCache"
    auto = "self.quantization.autoQuantize.formats"
    rules = [
        cel(
            "size(self.serving.runtimes) == 0 || ('hf' in self.export.formats && self.model.task == 'causal-lm')",
            "serving runtimes load the hf checkpoint of a causal LM: keep hf in spec.export.formats and "
            "spec.model.task causal-lm, or empty spec.serving.runtimes",
            fieldPath=".serving.runtimes",
        )
    ]
    for rt in RUNTIMES.values():
        words = runtime_words(rt)
        asks = f"self.serving.runtimes.exists(x, x.name == '{rt.name.value}')"
        loadable = _cel_list([f.value for f in QuantFormat if f in rt.formats])
        kv_loadable = _cel_list([KVCacheFormat.NONE.value] + [k.value for k in KVCacheFormat if k in rt.kv_caches])
        kv_refusal = KV_REFUSAL.replace("{choices}", "{kv_choices}")
        rules.append(
            cel(
                f"!has({fmt}) || !{asks} || {fmt} in {loadable}",
                _fallback(words),
                messageExpression=_cel_message(FORMAT_REFUSAL, words, format=fmt),
                fieldPath=".serving.runtimes",
            )
        )
        formats = {f.value: c for f, c in rt.formats.items()}
        rules += [
            {**r, "rule": f"!has({fmt}) || {r['rule']}"} for r in _cell_rules(asks, fmt, formats, words, "format")
        ]
        rules.append(
            cel(
                f"!{asks} || {kv} in {kv_loadable}",
                _fallback(words),
                messageExpression=_cel_message(kv_refusal, words, kv=kv),
                fieldPath=".quantization.kvCache",
            )
        )
        rules += _cell_rules(asks, kv, {k.value: c for k, c in rt.kv_caches.items()}, words, "kv")
        if rt.mixed_precision:
            rules.append(
                cel(
                    f"!has(self.quantization.autoQuantize) || !{asks} || {auto}.all(f, f in {loadable})",
                    _fallback(words),
                    messageExpression=_cel_message(
                        AUTO_FORMAT_REFUSAL, words, format=f"{auto}.filter(f, !(f in {loadable}))[0]"
                    ),
                    fieldPath=".quantization.autoQuantize.formats",
                )
            )
        else:
            rules.append(
                cel(
                    f"!has(self.quantization.autoQuantize) || !{asks}",
                    MIXED_REFUSAL.format(**words),
                    fieldPath=".quantization.autoQuantize",
                )
            )
    return rules


def _spec_rules() -> list[dict[str, str]]:
    immutable = (
        "model",
        "quantization",
        "calibration",
        "export",
        "engines",
        "serving",
        "evaluation",
        "resources",
        "scheduling",
        "output",
        "reuse",
    )
    return [
        *_matrix_rules(),
        *_serving_rules(),
        cel(
            "!('onnx' in self.export.formats) || self.model.task == 'encoder'",
            "ONNX export is for encoder models: set spec.model.task to encoder, "
            "or remove onnx from spec.export.formats",
            fieldPath=".export.formats",
        ),
        cel(
            "!('tensorrt_llm' in self.export.formats) || self.model.task == 'causal-lm'",
            "the tensorrt_llm checkpoint is for causal LMs: remove it from spec.export.formats for an encoder",
            fieldPath=".export.formats",
        ),
        cel(
            "self.model.task != 'encoder' || size(self.engines) == 0 || 'onnx' in self.export.formats",
            "encoder engines are built by TensorRT from ONNX: add onnx to spec.export.formats",
            fieldPath=".export.formats",
        ),
        cel(
            "!has(self.quantization.autoQuantize) || self.resources.gpus != 0",
            "automatic sizing (spec.resources.gpus: 0) does not model AutoQuantize's gradient pass: set "
            "spec.resources.gpus to a number",
            fieldPath=".resources.gpus",
        ),
        cel(
            "self.model.task == 'causal-lm' || self.quantization.kvCache == 'none'",
            "a KV cache exists only in causal LMs: set spec.quantization.kvCache to none for an encoder",
            fieldPath=".quantization.kvCache",
        ),
        cel(
            "!has(self.evaluation.gate) || !has(self.evaluation.gate.maxPerplexityIncrease) "
            "|| self.model.task == 'causal-lm'",
            "maxPerplexityIncrease applies to causal LMs; use minCosineSimilarity for an encoder",
            fieldPath=".evaluation.gate",
        ),
        cel(
            " && ".join(f"self.{f} == oldSelf.{f}" for f in immutable),
            "only spec.runPolicy can change after a QuantizationJob is created: delete and re-create "
            "it (or create one with a new name) to change the model, quantization, calibration, "
            "export, engines, serving, evaluation, resources, scheduling, output or reuse",
        ),
    ]


class QuantizationJobSpec(APIModel):
    """Desired state: which model to quantize, how, for which GPUs, and where artifacts go."""

    model_config = ConfigDict(json_schema_extra=cel_rules(*_spec_rules()))

    model: ModelSpec = Field(description="The model to quantize.")
    quantization: QuantizationSpec = Field(description="The quantization format and options.")
    calibration: CalibrationSpec = Field(description="Calibration data.")
    export: ExportSpec = Field(default_factory=ExportSpec, description="Checkpoint formats to export.")
    engines: list[EngineTarget] = Field(
        default=[],
        max_length=4,
        description="Engines to build, one per GPU architecture, each on a node of that architecture. "
        "Empty: export checkpoints only.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["architecture"]},
    )
    serving: ServingSpec = Field(
        default_factory=ServingSpec,
        description="Inference servers the exported hf checkpoint must load in. A format, KV cache or engine "
        "architecture one of them cannot load is refused at apply, and the runner checks the written "
        "hf_quant_config.json against each before it publishes the checkpoint.",
    )
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="Quality measurement and gate.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Resources per runner pod.")
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec, description="Placement overrides.")
    output: OutputSpec = Field(description="Where artifacts are written.")
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Retries, deadlines, clean-up, suspend.")
    reuse: ReusePolicy = Field(
        ReusePolicy.IF_AVAILABLE,
        description="`IfAvailable`: when a Succeeded job of this namespace did the same work (same model "
        "revision, quantization, calibration data, export, serving, evaluation and runner library versions: "
        "status.work.key), a GPU-less `reuse` stage checks that its artifacts still exist and match their "
        "sha256s and copies them into this job's output, with its engines whose target equals one in "
        "spec.engines; only the other engines are built (none: no GPU stage runs). status.reusedFrom names "
        "the job. A missing or changed artifact falls back to a normal run. `Never`: always run.",
    )

    def target_architectures(self) -> list[GPUArchitecture]:
        return [e.architecture for e in self.engines]

    def serving_problems(self) -> list[str]:
        return serving_refusals(self.quantization, self.serving, self.target_architectures())


# ---------------------------------------------------------------------------------------- status


class Phase(StrEnum):
    """Lifecycle phase of a QuantizationJob."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


PHASES = [p.value for p in Phase]
TERMINAL_PHASES = frozenset({Phase.SUCCEEDED, Phase.FAILED})


class Condition(APIModel):
    """A metav1.Condition."""

    type: str = Field(description="Condition type: Accepted, NodesAvailable, Running, Complete, Failed, QualityGate.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="Stable, CamelCase machine-readable reason.")
    message: str = Field("", description="Human-readable details.")
    last_transition_time: datetime | None = Field(None, description="When the status last changed.")
    observed_generation: int | None = Field(None, description="The spec generation this condition was computed from.")


#: Pod names a stage record lists (``StageStatus.pods``).
STAGE_PODS_LISTED = 32


class StageStatus(APIModel):
    """One runner Job: calibrate/quantize/export, or an engine build for one architecture."""

    name: str = Field(description="Stage name: `reuse`, `fetch` or `inspect`, `quantize`, `build-<architecture>`.")
    job_name: str | None = Field(None, description="The batch/v1 Job running this stage.")
    architecture: str | None = Field(None, description="Architecture the stage requires (builds only).")
    phase: str = Field("Pending", description="Pending, Running, Succeeded or Failed.")
    node: str | None = Field(None, description="Node the latest pod ran on.")
    gpu_product: str | None = Field(None, description="`nvidia.com/gpu.product` of that node.")
    attempts: int = Field(
        0, description="Pods started for this stage, also those since deleted (a node gone, an eviction)."
    )
    pods: list[Annotated[str, StringConstraints(max_length=253)]] = Field(
        default=[],
        max_length=STAGE_PODS_LISTED,
        description=f"The stage's pods at the last status write, newest first (at most {STAGE_PODS_LISTED}): "
        "a pod not listed before counts as one more attempt.",
    )
    start_time: datetime | None = Field(None, description="When the first pod of the stage started.")
    completion_time: datetime | None = Field(None, description="When the stage finished.")
    reason: str | None = Field(None, description="Why the stage is waiting or failed.")
    message: str | None = Field(None, description="Details for `reason`.")


class ModelSize(APIModel):
    """What the model stage (`fetch`, else `inspect`) read from the model's safetensors headers and config.json."""

    weight_bytes: int = Field(description="Bytes of all weight tensors, summed over the safetensors headers.")
    parameters: int = Field(description="Number of weight elements.")
    dtype: str = Field(description="Dominant weight dtype in the checkpoint, e.g. `BF16`.")
    layers: int | None = Field(None, description="Decoder layers (`num_hidden_layers`).")
    hidden_size: int | None = Field(None, description="`hidden_size` from config.json.")
    intermediate_size: int | None = Field(None, description="`intermediate_size` (MLP width) from config.json.")
    vocab_size: int | None = Field(None, description="`vocab_size` from config.json.")
    kv_heads: int | None = Field(None, description="`num_key_value_heads` (or `num_attention_heads`).")
    head_dim: int | None = Field(None, description="Attention head width.")


class MemoryEstimate(APIModel):
    """Estimated peak GPU memory of one GPU under a plan (docs/scaling.md has the model), MiB."""

    weights_mib: int = Field(description="This GPU's share of the weights, plus one layer for uneven splits.")
    activations_mib: int = Field(description="KV cache, logits and hidden states of one calibration batch.")
    algorithm_mib: int = Field(description="Extra state of the calibration algorithm (SmoothQuant, AWQ).")
    correction: float = Field(1.0, description="Factor learnt from earlier out-of-memory attempts (1: none).")
    peak_mib: int = Field(description="Sum of the above, times the correction.")
    usable_mib: int = Field(description="What the plan may use of each GPU: 90% of its memory, less 1 GiB.")


class QuantizePlan(APIModel):
    """How one attempt of the quantize stage runs, and why."""

    attempt: int = Field(description="Attempt number, from 1.")
    job_name: str = Field(description="The batch/v1 Job of this attempt.")
    gpus_per_pod: int = Field(description="GPUs each pod requests.")
    pods: int = Field(description="Pods (torchrun nodes); more than 1 runs an Indexed Job with FSDP2.")
    batch_size: int = Field(description="Calibration batch size (0: the runner probes).")
    layerwise: bool = Field(False, description="Layer-wise calibration with per-layer checkpoints.")
    gpu_memory_mib: int | None = Field(None, description="GPU memory (MiB) of the nodes the plan was made for.")
    estimate: MemoryEstimate | None = Field(None, description="Estimated memory per GPU (auto sizing only).")
    reason: str = Field(description="Why this plan: the numbers it came from, or what the last attempt hit.")
    outcome: str | None = Field(None, description="How the attempt ended: Succeeded, or the failure reason.")


class Progress(APIModel):
    """Progress of the running stage, as the runner reports it."""

    stage: str | None = Field(None, description="Stage (and runner step) in progress.")
    percent: int = Field(0, ge=0, le=100, description="Percent of the whole job done.")
    eta_seconds: int | None = Field(None, description="Estimated seconds left.")
    message: str | None = Field(None, description="What the runner is doing.")


class ServingTarget(APIModel):
    """A runtime that loads a checkpoint, judged from the hf_quant_config.json the runner wrote."""

    name: str = Field(description="Runtime: tensorrt-llm, vllm or sglang.")
    min_version: str = Field(description="Oldest version of the runtime that loads this checkpoint.")
    architectures: list[str] = Field(default=[], description="GPU architectures the runtime runs it on.")
    command: str = Field(
        description="Serve command: the checkpoint path is the folder with the output PersistentVolumeClaim "
        "mounted at /mnt/<claimName> (local runs: the folder itself)."
    )


class Artifact(APIModel):
    """A finished artifact: a checkpoint, an ONNX model or an engine."""

    kind: Literal["checkpoint", "onnx", "engine", "manifest"] = Field(
        description="checkpoint, onnx, engine or manifest."
    )
    format: str = Field(
        description="Export format (`hf`, `tensorrt_llm`, `onnx`) or engine kind (`tensorrt`, `tensorrt_llm`)."
    )
    uri: str = Field(description="Where it is: `pvc://<claim>/<path>` or `s3://<bucket>/<key>`.")
    architecture: str | None = Field(None, description="GPU architecture an engine was built for.")
    compute_capability: str | None = Field(None, description="Compute capability an engine was built on, e.g. `9.0`.")
    tensorrt_version: str | None = Field(None, description="TensorRT (or TensorRT-LLM) version that built an engine.")
    size_bytes: int | None = Field(None, description="Total size in bytes.")
    sha256: str | None = Field(None, description="SHA-256 of the file, or of the sorted file digests of a folder.")
    runtimes: list[ServingTarget] | None = Field(
        None,
        description="hf checkpoints: the serving runtimes that load it, each with a serve command (empty: none does).",
    )


class Quality(APIModel):
    """Quality before and after quantization."""

    metric: str = Field(description="`perplexity` (causal LMs) or `cosine_similarity` (encoders).")
    baseline: float | None = Field(None, description="Value for the unquantized model.")
    quantized: float | None = Field(None, description="Value for the quantized model.")
    degradation: float | None = Field(None, description="Relative perplexity increase, or 1 - cosine similarity.")
    gate_passed: bool | None = Field(None, description="Whether the quality gate passed (absent when no gate).")


class RunnerReport(APIModel):
    """A runner pod's progress report about its stage. Runners send it to the operator's report
    endpoint (authenticated as their own pod); the operator copies it here. Progress only: phase,
    conditions, artifacts and quality come from what the operator observes (Jobs, pods, the
    runner's termination message), never from a report."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    step: str | None = Field(
        None,
        max_length=64,
        description="Runner step in progress: fetch (the fetch stage), inspect (the inspect stage), resolve, load, "
        "data, baseline, quantize, evaluate, export, serving (checks the checkpoint against spec.serving), build, "
        "report.",
    )
    percent: int = Field(0, ge=0, le=100, description="Percent of this stage done.")
    eta_seconds: int | None = Field(None, description="Estimated seconds left in this stage.")
    message: str | None = Field(None, max_length=1024, description="Latest progress message.")
    step_seconds: dict[str, float] = Field(default={}, max_length=32, description="Wall time of each finished step.")
    updated_at: datetime | None = Field(None, description="When the runner sent this report.")


class WorkInputs(APIModel):
    """What a job's work was done on, as resolved at run time (the spec alone cannot say)."""

    model_revision: str = Field(
        description="The model's content: `hf:<repo>@<commit>`, `s3:<digest of the objects' keys, sizes and ETags>` "
        "or `files:<sha256 over the folder's files>` (PVC)."
    )
    calibration_data: str = Field(description="`sha256:` of the calibration and held-out texts used.")
    versions: dict[str, str] = Field(
        default={}, description="Versions of the runner libraries that shape the artifacts (ModelOpt, torch, ...)."
    )


class WorkRecord(APIModel):
    """The identity of a finished job's work: an identical request on the same inputs has the same key."""

    key: str = Field(description="sha256 of the recipe and the inputs (`qjob_api.work.work_key`).")
    recipe_key: str = Field(description="sha256 of the recipe only: what the spec asks for, before inputs resolve.")
    inputs: WorkInputs = Field(description="The resolved inputs.")


class JobReference(APIModel):
    """A QuantizationJob, by name and uid (a re-created job of the same name has a new uid)."""

    namespace: str = Field(description="Namespace of the job.")
    name: str = Field(description="Name of the job.")
    uid: str = Field(description="metadata.uid of the job.")


class ReuseStatus(APIModel):
    """What the reuse check found (spec.reuse IfAvailable and an earlier job with the same recipe)."""

    candidates: list[JobReference] = Field(
        default=[], description="Succeeded jobs with the same recipe that the reuse stage checked, newest first."
    )
    outcome: Literal["Checking", "Reused", "NotReused"] = Field(
        "Checking", description="Checking, Reused (no GPU stage ran) or NotReused (the job ran normally)."
    )
    reason: str | None = Field(None, description="Why not reused, e.g. ReuseInputsChanged, ReuseArtifactChanged.")
    message: str | None = Field(None, description="Details for `reason`.")
    engines: list[str] | None = Field(
        None,
        description="Architectures whose engines were reused with the checkpoint (their build stages do not run; "
        "the other engines are built).",
    )


class QuantizationJobStatus(APIModel):
    """Observed state, written by the operator only."""

    phase: str = Field(
        "Pending", description="Pending, Running, Succeeded, Failed or Suspended.", json_schema_extra={"enum": PHASES}
    )
    reason: str | None = Field(
        None, description="Stable reason of the latest phase change (e.g. NoMatchingNodes, OOMKilled)."
    )
    message: str | None = Field(None, description="Human-readable explanation of `reason`.")
    observed_generation: int | None = Field(None, description="The spec generation the operator last acted on.")
    conditions: list[Condition] = Field(
        default=[],
        description="Conditions with stable reasons.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    stages: list[StageStatus] = Field(default=[], description="One record per runner Job.")
    model_size: ModelSize | None = Field(
        None,
        description="The model's size as the fetch or inspect stage read it: sizes the later pods' disk, and "
        "their GPUs when spec.resources.gpus is 0 (auto).",
    )
    plans: list[QuantizePlan] = Field(
        default=[], description="One plan per attempt of the quantize stage; the last one is current."
    )
    progress: Progress | None = Field(None, description="Progress of the whole job.")
    target_architectures: str | None = Field(
        None, description="Engine architectures, comma-separated (printer column)."
    )
    artifacts: list[Artifact] = Field(default=[], description="Finished artifacts.")
    quality: Quality | None = Field(None, description="Quality before and after quantization.")
    runner_reports: dict[str, RunnerReport] = Field(
        default={}, description="Latest progress report of each stage's runner, keyed by stage name."
    )
    start_time: datetime | None = Field(None, description="When the first runner pod started.")
    completion_time: datetime | None = Field(None, description="When the job reached Succeeded or Failed.")
    work: WorkRecord | None = Field(
        None, description="The work key of a Succeeded job: later jobs with the same key may reuse its artifacts."
    )
    reuse: ReuseStatus | None = Field(None, description="The reuse check, when one ran.")
    reused_from: JobReference | None = Field(
        None, description="The job whose verified artifacts this job reused (no GPU stage ran)."
    )


#: Rules on the whole object (CEL sees metadata.name there).
ROOT_RULES = [
    cel(
        f"size(self.metadata.name) <= {NAME_MAX_LENGTH}",
        f"metadata.name must be at most {NAME_MAX_LENGTH} characters (it labels the job's Jobs and pods): "
        "choose a shorter name",
    )
]


class QuantizationJob(APIModel):
    """Quantizes a model with NVIDIA ModelOpt, exports checkpoints and builds engines per GPU architecture."""

    api_version: Literal["qjob.dev/v1alpha1"] = Field(API_VERSION, description="qjob.dev/v1alpha1")
    kind: Literal["QuantizationJob"] = Field(KIND, description="QuantizationJob")
    metadata: dict[str, Any] = Field(default={}, description="Standard object metadata.")
    spec: QuantizationJobSpec = Field(description="Desired state.")
    status: QuantizationJobStatus | None = Field(None, description="Observed state.")


# ---------------------------------------------------------------------------------------- helpers

_UNITS = {
    "": 1 / 2**20,
    "Ki": 1 / 2**10,
    "Mi": 1,
    "Gi": 2**10,
    "Ti": 2**20,
    "k": 1e3 / 2**20,
    "M": 1e6 / 2**20,
    "G": 1e9 / 2**20,
    "T": 1e12 / 2**20,
}


def quantity_to_mib(quantity: str) -> int:
    """``40Gi`` -> 40960. Used to compare with the ``nvidia.com/gpu.memory`` label (MiB)."""
    match = re.fullmatch(_QUANTITY, quantity)
    if not match:
        raise ValueError(f"not a quantity: {quantity!r}")
    number = float(quantity[: len(quantity) - len(match.group(2) or "")])
    return int(number * _UNITS[match.group(2) or ""])
