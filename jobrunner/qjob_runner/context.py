"""The one typed context every step reads and writes."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qjob_api.capabilities import ModelTask
from qjob_api.runner import CONFIG_ENV, CONFIG_PATH, ReuseOutcome, RunnerConfig
from qjob_api.v1alpha1 import Artifact, ModelSize, Quality, ServingTarget, WorkInputs

from .artifacts import FileHashes, Staging
from .errors import InvalidConfig
from .ranks import Ranks
from .reporting import Reporter


@dataclass
class Paths:
    output_dir: Path
    work_dir: Path
    model_dir: Path | None = None  # resolved local folder with config.json + weights + tokenizer

    @classmethod
    def from_config(cls, config: RunnerConfig) -> Paths:
        out = Path(config.output_dir).resolve()
        work = Path(config.work_dir).resolve() if config.work_dir else out / ".qjob-work"
        return cls(output_dir=out, work_dir=work)


@dataclass
class CalibData:
    """Tokenised calibration batches (left padded) and the held-out evaluation texts."""

    batches: list[dict[str, Any]] = field(default_factory=list)
    batch_size: int = 0
    num_samples: int = 0
    sequence_length: int = 0
    eval_texts: list[str] = field(default_factory=list)
    source: str = ""
    #: sha256 of the calibration and held-out texts (part of the work key)
    digest: str = ""


@dataclass
class RunContext:
    config: RunnerConfig
    paths: Paths
    reporter: Reporter
    #: this process among the torchrun ranks of a multi-pod stage (one rank otherwise)
    ranks: Ranks = field(default_factory=Ranks)
    staging: Staging | None = None
    model: Any = None
    tokenizer: Any = None
    device: str = "cpu"
    original_padding_side: str = "right"
    data: CalibData = field(default_factory=CalibData)
    #: ModelOpt config actually passed to mtq.quantize (after KV cache merge, overrides, exclusions).
    quant_config: dict[str, Any] | None = None
    #: True when the calibrated state was restored from work_dir instead of recomputed.
    resumed: bool = False
    baseline: Any = None  # perplexity (float) or reference embeddings (tensor)
    #: held-out token windows (causal LMs): measured by baseline and evaluate, re-used by the export check
    eval_windows: list[Any] | None = None
    #: the fake-quantized encoder's embeddings of the held-out texts, compared with the exported model's
    quantized_embeddings: Any = None
    quality: Quality | None = None
    #: open ``.use`` file of the model cache entry this stage reads (a shared lock against eviction)
    cache_lease: Any = None
    #: JSON-able figures for the manifest (no tensors: those have their own fields)
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: list[Artifact] = field(default_factory=list)
    #: staged path of each artifact, keyed by artifact uri-relative name (e.g. "hf", "onnx/model.onnx")
    staged: dict[str, Path] = field(default_factory=dict)
    #: manifest entry of the engine a build step registered (it registers its folder itself)
    engine_entry: dict[str, Any] | None = None
    #: runtimes that load each staged checkpoint (the ``serving`` step), keyed like ``staged``
    serving_targets: dict[str, list[ServingTarget]] = field(default_factory=dict)
    step_seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: the inspect stage's finding (safetensors headers + config.json)
    model_size: ModelSize | None = None
    #: background work (e.g. writing resume state) joined before the run reports success
    background: list[Any] = field(default_factory=list)
    #: sha256 of a PVC model's files, hashed in the background from the resolve step on (work key)
    model_hashes: FileHashes | None = None
    #: the resolved inputs of the work (quantize and reuse stages; see qjob_api.work)
    work: WorkInputs | None = None
    #: what the reuse stage did
    reuse: ReuseOutcome | None = None

    @property
    def task(self) -> ModelTask:
        return self.config.model.task

    @property
    def stage(self) -> str:
        return self.config.stage


def load_config(source: str | None = None) -> RunnerConfig:
    """Config from a path, else env ``QJOB_RUNNER_CONFIG`` (a path or inline JSON), else the
    default mount ``/etc/qjob/runner.json``."""
    text: str | None = None
    where = source
    if source is None:
        env = os.environ.get(CONFIG_ENV)
        if env and env.lstrip().startswith("{"):
            text, where = env, f"${CONFIG_ENV}"
        else:
            where = env or CONFIG_PATH
    if text is None:
        path = Path(where)  # type: ignore[arg-type]
        if not path.is_file():
            raise InvalidConfig(
                f"runner config {path} does not exist",
                f"pass --config FILE, set {CONFIG_ENV} to a path or inline JSON, or mount it at {CONFIG_PATH}",
            )
        text = path.read_text()
        if path.suffix in {".yaml", ".yml"}:
            import yaml

            text = json.dumps(yaml.safe_load(text))
    try:
        return RunnerConfig.model_validate_json(text)
    except ValueError as exc:
        raise InvalidConfig(f"runner config {where} is not valid: {exc}", "fix the fields named above") from None
