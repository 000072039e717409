"""The contract between the operator and the jobrunner.

The operator turns a QuantizationJob into a small versioned ``RunnerConfig`` (passed to the runner
pod inline, as JSON in ``QJOB_RUNNER_CONFIG``); the runner needs no Kubernetes knowledge to run
one, so the same config runs locally from a file. The runner answers with a ``RunnerResult`` (a JSON file locally, the
container's termination message in a cluster) and an exit code from ``ExitCode``.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Literal

from pydantic import Field

from .capabilities import GPUArchitecture, ModelTask
from .v1alpha1 import (
    APIModel,
    Artifact,
    EngineTarget,
    EvaluationSpec,
    ExportSpec,
    HuggingFaceDataset,
    JobReference,
    ModelSize,
    Quality,
    QuantizationSpec,
    ServingSpec,
    WorkInputs,
)
from .work import WorkRecipe

RUNNER_API_VERSION = "qjob.dev/runner/v1"
#: The stage that only reads the model's size (auto sizing without a fetch stage), on a pod without GPUs.
INSPECT_STAGE = "inspect"
#: The stage that checks an earlier identical job's artifacts and copies them (no GPU).
REUSE_STAGE = "reuse"
#: The reuse stage checks at most this many earlier jobs (newest first).
MAX_REUSE_CANDIDATES = 3

#: Where the runner reads its config when the env var is unset; the env var holds a path or inline
#: JSON (the operator sets it to inline JSON).
CONFIG_PATH = "/etc/qjob/runner.json"
CONFIG_ENV = "QJOB_RUNNER_CONFIG"
#: Kubernetes reads at most 4096 bytes of a termination message.
TERMINATION_MESSAGE_LIMIT = 4096


class ExitCode(IntEnum):
    """Runner exit codes. The operator's Job podFailurePolicy fails the job at once on the
    "do not retry" codes and retries the others within spec.runPolicy.backoffLimit."""

    OK = 0
    INVALID_CONFIG = 2  # bad config or unsupported format/architecture combination: do not retry
    INVALID_INPUT = 3  # model or data missing/corrupt: do not retry
    QUALITY_GATE_FAILED = 4  # artifacts measured worse than the gate allows: do not retry
    TRANSIENT = 75  # network, hub, filesystem hiccup: retry (EX_TEMPFAIL)
    OUT_OF_MEMORY = 76  # CUDA or host OOM caught by the runner: retry
    RENDEZVOUS_FAILED = 77  # the torchrun ranks of a multi-pod stage could not meet: retry


#: Exit codes that make the operator fail the QuantizationJob without retrying.
NON_RETRYABLE_EXIT_CODES = (ExitCode.INVALID_CONFIG, ExitCode.INVALID_INPUT, ExitCode.QUALITY_GATE_FAILED)


class RunnerS3(APIModel):
    """An S3 location as the runner sees it: credentials come from two environment variables
    (``<credentials_env>_ACCESS_KEY_ID`` / ``_SECRET_ACCESS_KEY``, set by the operator from the
    Secret), else boto3's default chain (IRSA, instance profile)."""

    field: str = Field(description="The spec field this location came from, named in error messages.")
    endpoint: str | None = None
    region: str = "us-east-1"
    bucket: str
    prefix: str = ""
    credentials_env: str | None = None
    insecure: bool = False
    ca_bundle: str | None = Field(None, description="Path of a PEM CA bundle file.")

    @property
    def uri(self) -> str:
        key = self.prefix.strip("/")
        return f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"


class RunnerModel(APIModel):
    """The model, resolved to a local folder, a hub repository or an S3 prefix."""

    path: str | None = Field(None, description="Local folder (a mounted PVC path in a cluster).")
    s3: RunnerS3 | None = Field(None, description="Objects under an S3 prefix, downloaded into the model cache.")
    hf_repo: str | None = Field(None, description="Hugging Face repository id.")
    revision: str = Field("main", description="Hub revision.")
    cache_dir: str | None = Field(
        None,
        description="The shared model cache volume: the `fetch` stage downloads the model into it; the "
        "other stages read the entry the fetch stage recorded and download nothing.",
    )
    cache_max_bytes: int | None = Field(None, description="Bound of the shared cache; default 90% of its volume.")
    cache_keep_seconds: int = Field(86400, description="Entries used this recently are never evicted.")
    cache_role: Literal["own", "fill", "wait"] = Field(
        "own",
        description="`own`: the fetch stage downloads into the cache it mounts read-write (the namespace's). "
        "`fill`: a fill Job in the shared cache's namespace downloads into the cross-namespace cache and keeps "
        "`fills/<fill_record>.json` current. `wait`: the job's own fetch stage mounts its namespace's read-only "
        "view of that cache, downloads nothing, and follows the fill record until the entry is ready.",
    )
    fill_record: str | None = Field(
        None, description="Name of the fill record (the fill Job's name) under `fills/` (roles fill and wait)."
    )
    fill_stall_seconds: int = Field(
        600, description="Role wait: fail (retryably) when the fill record has not changed for this long."
    )
    task: ModelTask = ModelTask.CAUSAL_LM
    trust_remote_code: bool = False
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"


class RunnerDataset(APIModel):
    """Calibration text: a local file (JSONL or text; ConfigMaps and PVCs are mounted as files)
    or a hub dataset."""

    path: str | None = None
    hugging_face: HuggingFaceDataset | None = None


class RunnerCalibration(APIModel):
    dataset: RunnerDataset
    samples: int = 512
    sequence_length: int = 512
    batch_size: int = 0
    layerwise: bool = False


#: Where runner pods find their report token: a projected ServiceAccount token for the report
#: endpoint's audience, bound to the pod (the kubelet rotates it).
REPORT_TOKEN_PATH = "/var/run/secrets/qjob.dev/report/token"


class ReuseCandidate(APIModel):
    """An earlier Succeeded job whose artifacts the reuse stage may take, as the operator saw it."""

    job: JobReference
    work_key: str = Field(description="Its status.work.key.")
    inputs: WorkInputs | None = Field(None, description="Its status.work.inputs (to say what changed).")
    output_uri: str = Field(description="Base URI of its artifacts (`pvc://claim/path` or `s3://bucket/prefix`).")
    output_dir: str | None = Field(None, description="Its PVC output folder as mounted (read-only) in this pod.")
    output_s3: RunnerS3 | None = Field(None, description="Its S3 output.")
    artifacts: list[Artifact] = Field(default_factory=list, description="Its status.artifacts (uris and sha256s).")


class RunnerReuse(APIModel):
    candidates: list[ReuseCandidate] = Field(default_factory=list, max_length=MAX_REUSE_CANDIDATES)
    engines: list[EngineTarget] = Field(
        default_factory=list,
        description="The engines this job asks for: a candidate's engine with the same target is reused.",
    )


class ReuseOutcome(APIModel):
    """What the reuse stage did: reused (``reused_from`` set) or why not."""

    reused_from: JobReference | None = None
    reason: str
    message: str = ""
    engines: list[GPUArchitecture] = Field(
        default_factory=list, description="Architectures whose engines were reused (their builds do not run)."
    )


class Reporting(APIModel):
    """Where progress goes besides the log. ``operator`` POSTs each report (a ``RunnerReport``)
    to the operator's report endpoint over HTTPS with the pod's projected ServiceAccount token:
    an audience the Kubernetes API refuses, so the runner holds no API credential at all."""

    kind: Literal["file", "operator"] = "file"
    url: str | None = Field(None, description="The stage's report URL (`operator` only).")
    ca_cert: str | None = Field(None, description="PEM of the CA that signed the endpoint's certificate.")
    token_path: str = Field(REPORT_TOKEN_PATH, description="File holding the pod's report token.")


class RunnerConfig(APIModel):
    """Everything one runner invocation needs."""

    api_version: Literal["qjob.dev/runner/v1"] = RUNNER_API_VERSION
    job: str = Field(description="QuantizationJob name (used in logs and manifests).")
    job_uid: str = Field(
        "local",
        pattern=r"^[A-Za-z0-9-]{1,64}$",
        description="QuantizationJob uid: resume state is only ever restored by the job that wrote it.",
    )
    stage: str = Field(
        "quantize",
        description="`fetch` (model into the shared cache, no GPU), `inspect` (read the model's size only, no "
        "GPU), `quantize` (calibrate, quantize, export, evaluate) or `build-<arch>`.",
    )
    model: RunnerModel
    quantization: QuantizationSpec
    calibration: RunnerCalibration
    export: ExportSpec = Field(default_factory=ExportSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    serving: ServingSpec = Field(
        default_factory=ServingSpec, description="Runtimes the hf checkpoint must load in (checked after export)."
    )
    target_architectures: list[GPUArchitecture] = Field(
        default_factory=list, description="Every architecture the job builds engines for (pre-flight check)."
    )
    engine: EngineTarget | None = Field(None, description="The engine this invocation builds (build stages only).")
    output_dir: str = Field(description="Folder the finished artifacts are moved into.")
    output_uri: str | None = Field(
        None, description="How users address output_dir (e.g. `pvc://claim/path`); artifact URIs are reported under it."
    )
    output_s3: RunnerS3 | None = Field(
        None, description="Upload the finished artifacts here (manifest.json last); output_dir is then local scratch."
    )
    work_dir: str | None = Field(None, description="Scratch and resume state; default `<output_dir>/.qjob-work`.")
    reporting: Reporting = Field(default_factory=Reporting)
    work_recipe: WorkRecipe | None = Field(
        None, description="What the spec asks for; with the resolved inputs it gives the work key (qjob_api.work)."
    )
    reuse: RunnerReuse | None = Field(None, description="The earlier jobs to check (the reuse stage only).")

    @property
    def is_build(self) -> bool:
        return self.engine is not None

    @property
    def is_inspect(self) -> bool:
        return self.stage == INSPECT_STAGE


class RunnerResult(APIModel):
    """The runner's final word: result JSON file, and (compacted) the termination message."""

    outcome: Literal["Succeeded", "Failed"]
    stage: str
    exit_code: int = 0
    reason: str | None = None
    message: str | None = None
    failed_step: str | None = None
    artifacts: list[Artifact] = Field(default_factory=list)
    quality: Quality | None = None
    step_seconds: dict[str, float] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    model_size: ModelSize | None = Field(None, description="Set by the fetch and inspect stages.")
    work: WorkInputs | None = Field(None, description="The resolved inputs of the work (quantize and reuse stages).")
    reuse: ReuseOutcome | None = Field(None, description="Set by the reuse stage.")

    def termination_message(self) -> str:
        """JSON that fits Kubernetes' 4096-byte termination message (drops detail if needed)."""
        for exclude in (set(), {"versions"}, {"versions", "step_seconds"}, {"versions", "step_seconds", "artifacts"}):
            text = self.model_dump_json(by_alias=True, exclude_none=True, exclude=exclude)
            if len(text.encode()) <= TERMINATION_MESSAGE_LIMIT:
                return text
        short = self.model_copy(update={"message": (self.message or "")[:1000]})
        return short.model_dump_json(
            by_alias=True,
            exclude_none=True,
            include={"outcome", "stage", "exit_code", "reason", "message", "model_size", "work", "reuse"},
        )
