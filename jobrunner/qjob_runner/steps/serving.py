"""serving: check the exported checkpoint's quantization metadata against the serving table.

The table (``qjob_api.capabilities.RUNTIMES``) says what each runtime's ModelOpt loader accepts;
this step reads what ModelOpt actually wrote (``hf_quant_config.json``, else ``config.json``'s
``quantization_config``: quant algo, KV cache algo, group size, excluded modules) and judges the
checkpoint runtime by runtime. A runtime asked for in spec.serving.runtimes that would refuse the
checkpoint fails the stage before anything is published (InvalidConfig: retrying cannot help);
every runtime that loads it is recorded on the artifact, with a serve command.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qjob_api.capabilities import (
    HF_KV_CACHE,
    HF_QUANTIZATION,
    MIXED_PRECISION,
    RUNTIMES,
    GPUArchitecture,
    QuantFormat,
    Runtime,
    version_key,
)
from qjob_api.v1alpha1 import ServingTarget

from ..context import RunContext
from ..errors import InvalidConfig

HF_QUANT_CONFIG = "hf_quant_config.json"
#: Where serve commands expect the output PersistentVolumeClaim (see ServingTarget.command).
MOUNT_ROOT = "/mnt"


@dataclass(frozen=True)
class QuantMetadata:
    """The quantization a checkpoint declares, as a loader reads it."""

    source: str  # file (and key) it was read from
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    group_size: Any
    exclude_modules: Any
    fields: dict[str, Any] = field(default_factory=dict)  # the whole `quantization` section
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)  # quantized_layers of MIXED_PRECISION

    def describe(self) -> str:
        parts = [f"quant_algo {self.quant_algo}", f"kv_cache_quant_algo {self.kv_cache_quant_algo}"]
        if self.group_size is not None:
            parts.append(f"group_size {self.group_size}")
        return f"{self.source} says {', '.join(parts)}"


def _from_hf_quant_config(folder: Path) -> QuantMetadata | None:
    path = folder / HF_QUANT_CONFIG
    if not path.is_file():
        return None
    q = json.loads(path.read_text()).get("quantization") or {}
    return QuantMetadata(
        source=HF_QUANT_CONFIG,
        quant_algo=q.get("quant_algo"),
        kv_cache_quant_algo=q.get("kv_cache_quant_algo"),
        group_size=q.get("group_size"),
        exclude_modules=q.get("exclude_modules"),
        fields=q,
        layers=q.get("quantized_layers") or {},
    )


def _from_config_json(folder: Path) -> QuantMetadata | None:
    """ModelOpt's flat ``quantization_config`` in config.json (``ignore``, ``kv_cache_scheme``)."""
    path = folder / "config.json"
    q = json.loads(path.read_text()).get("quantization_config") if path.is_file() else None
    if not q or not str(q.get("quant_method", "")).startswith("modelopt"):
        return None
    scheme = q.get("kv_cache_scheme") or {}
    kv = "FP8" if scheme.get("type") == "float" and scheme.get("num_bits") == 8 else None
    return QuantMetadata(
        source="config.json quantization_config",
        quant_algo=q.get("quant_algo"),
        kv_cache_quant_algo=kv,
        group_size=q.get("group_size"),
        exclude_modules=q.get("ignore"),
        fields={**q, "exclude_modules": q.get("ignore"), "kv_cache_quant_algo": kv},
        layers=q.get("quantized_layers") or {},
    )


def read_metadata(folder: Path) -> QuantMetadata:
    """``hf_quant_config.json`` (what vLLM, SGLang and TensorRT-LLM read first), else config.json's."""
    meta = _from_hf_quant_config(folder) or _from_config_json(folder)
    if meta is None:
        raise InvalidConfig(
            f"the exported checkpoint {folder} has neither {HF_QUANT_CONFIG} nor a ModelOpt quantization_config "
            "in config.json, so no serving runtime would load it as quantized",
            "report this: the installed nvidia-modelopt exported no quantization metadata",
        )
    return meta


def disagreement(folder: Path) -> str | None:
    """Loaders read one file or the other: both must name the same quant_algo."""
    hf, config = _from_hf_quant_config(folder), _from_config_json(folder)
    if hf and config and str(hf.quant_algo).upper() != str(config.quant_algo).upper():
        return f"{HF_QUANT_CONFIG} says quant_algo {hf.quant_algo} but config.json says {config.quant_algo}"
    return None


def formats_of(quant_algo: str | None) -> list[QuantFormat]:
    """Our formats whose checkpoints carry this quant_algo (loaders compare it case-insensitively)."""
    algo = str(quant_algo or "").upper()
    return [f for f, hf in HF_QUANTIZATION.items() if hf.quant_algo.upper() == algo]


def _layer_algos(meta: QuantMetadata) -> list[tuple[str | None, dict[str, Any], str]]:
    """(quant_algo, its fields, where) of every quantization the checkpoint uses."""
    if str(meta.quant_algo).upper() != MIXED_PRECISION:
        return [(meta.quant_algo, meta.fields, "")]
    seen: dict[tuple[Any, Any], tuple[dict[str, Any], str]] = {}
    for layer, cfg in meta.layers.items():
        seen.setdefault((cfg.get("quant_algo"), cfg.get("group_size")), ({**meta.fields, **cfg}, f" (layer {layer})"))
    return [(algo, fields, where) for (algo, _), (fields, where) in seen.items()]


@dataclass(frozen=True)
class Verdict:
    """What one runtime makes of a checkpoint."""

    runtime: Runtime
    refusals: list[str]
    formats: list[QuantFormat]  # table rows the checkpoint's layers match
    min_version: str
    architectures: frozenset[GPUArchitecture]


def judge(meta: QuantMetadata, rt: Runtime) -> Verdict:
    """Whether ``rt``'s loader takes this metadata, by the serving table."""
    refusals: list[str] = []
    cells, formats = [], []
    if not isinstance(meta.exclude_modules, (list, type(None))):
        refusals.append(f"{rt.title} needs exclude_modules to be a list")
    if str(meta.quant_algo).upper() == MIXED_PRECISION and not rt.mixed_precision:
        refusals.append(f"{rt.title} does not load quant_algo {MIXED_PRECISION}")
    for algo, present, where in _layer_algos(meta):
        loadable = [f for f in formats_of(algo) if f in rt.formats]
        if not loadable:
            refusals.append(f"{rt.title} does not load quant_algo {algo}{where}")
            continue
        fmt = loadable[0]
        formats.append(fmt)
        cells.append(rt.formats[fmt])
        expected = HF_QUANTIZATION[fmt].group_size
        if expected is not None and present.get("group_size") != expected:
            has = present.get("group_size")
            refusals.append(f"{rt.title} loads {algo} with group_size {expected}, the checkpoint has {has}{where}")
        missing = [k for k in rt.required_fields.get(fmt, ()) if k not in present]
        empty = [k for k in rt.non_empty_fields.get(fmt, ()) if k in present and not present[k]]
        if missing:
            refusals.append(f"{rt.title} needs {', '.join(missing)} in {meta.source} for {algo}")
        if empty:
            refusals.append(f"{rt.title} refuses an empty {', '.join(empty)} for {algo}")
    kv_formats = [k for k, algo in HF_KV_CACHE.items() if algo and algo == str(meta.kv_cache_quant_algo).upper()]
    if meta.kv_cache_quant_algo not in (None, "none"):
        if not kv_formats or kv_formats[0] not in rt.kv_caches:
            refusals.append(f"{rt.title} does not load kv_cache_quant_algo {meta.kv_cache_quant_algo}")
        else:
            cells.append(rt.kv_caches[kv_formats[0]])
    min_version = max((c.min_version for c in cells), key=version_key, default="0.0")
    archs = frozenset(GPUArchitecture)
    for c in cells:
        archs &= c.architectures
    return Verdict(rt, refusals, formats, min_version, archs)


def checkpoint_path(ctx: RunContext, name: str) -> str:
    """The published folder as a serving pod sees it: the output claim mounted at /mnt/<claim>."""
    uri = ctx.config.output_uri or ""
    if uri.startswith("pvc://"):
        return f"{MOUNT_ROOT}/{uri.removeprefix('pvc://').rstrip('/')}/{name}"
    return str(ctx.paths.output_dir / name)


def target(verdict: Verdict, path: str) -> ServingTarget:
    rt = verdict.runtime
    fmt = verdict.formats[0] if len(set(verdict.formats)) == 1 else None  # mixed precision: no flag
    return ServingTarget(
        name=rt.name.value,
        min_version=verdict.min_version,
        architectures=[a.value for a in GPUArchitecture if a in verdict.architectures],
        command=rt.serve_command(path, fmt),
    )


def run(ctx: RunContext) -> None:
    folder = ctx.staged.get("hf")
    requested = ctx.config.serving.runtimes
    if folder is None:
        if requested:
            raise InvalidConfig(
                "spec.serving.runtimes load the hf checkpoint, and this job exports none",
                "add hf to spec.export.formats, or empty spec.serving.runtimes",
            )
        return
    ctx.reporter.update(step="serving", message=f"checking {HF_QUANT_CONFIG} against the serving runtimes")
    meta = read_metadata(folder)
    verdicts = {rt.name: judge(meta, rt) for rt in RUNTIMES.values()}
    if conflict := disagreement(folder):  # no runtime can be promised a checkpoint that contradicts itself
        verdicts = {name: replace(v, refusals=[*v.refusals, conflict]) for name, v in verdicts.items()}
    problems = []
    for want in requested:
        verdict = verdicts[want.name]
        problems += verdict.refusals
        if (
            not verdict.refusals
            and want.min_version
            and version_key(want.min_version) < version_key(verdict.min_version)
        ):
            problems.append(
                f"{verdict.runtime.title} loads it from version {verdict.min_version} on, and spec.serving.runtimes "
                f"asks for {want.min_version}"
            )
    asked = ctx.config.quantization.format
    if problems:
        raise InvalidConfig(
            f"the exported {asked.value if asked else 'autoQuantize'} checkpoint cannot be served as asked: "
            f"{meta.describe()}; " + "; ".join(problems),
            "choose a spec.quantization.format that every runtime in spec.serving.runtimes loads (README, "
            "Serving runtimes), or remove the runtime",
        )
    path = checkpoint_path(ctx, "hf")
    ctx.serving_targets["hf"] = [target(v, path) for v in verdicts.values() if not v.refusals]
    ctx.metrics["serving"] = {
        "metadata": {k: meta.fields.get(k) for k in ("quant_algo", "kv_cache_quant_algo", "group_size")},
        "source": meta.source,
        "refusals": {name.value: v.refusals for name, v in verdicts.items() if v.refusals},
    }
