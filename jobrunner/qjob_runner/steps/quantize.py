"""quantize: ModelOpt post-training quantization (calibration) or AutoQuantize.

The ModelOpt config is the format's preset (``qjob_api.capabilities.MODELOPT_PRESETS``) with the
KV cache preset appended (ModelOpt 0.47 configs are *ordered lists* of quantizer entries; later
entries win, which is exactly how ``update_quant_cfg_with_kv_cache_quant`` merges them), the
algorithm override, and one ``enable: False`` entry per excluded module pattern.

After calibration the ModelOpt state plus the calibrated tensors (quantizer amax/scales and any
weights that SmoothQuant/AWQ rescaled) are saved into ``work_dir`` as data only (``resume_state``:
safetensors + JSON), named by the job uid and a hash of everything that determines them. A retried
pod of the same job restores that state and skips calibration.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from qjob_api.capabilities import (
    MODELOPT_KV_PRESETS,
    MODELOPT_PRESETS,
    MULTI_RANK_ALGORITHMS,
    KVCacheFormat,
    ModelTask,
)

from .. import resume_state
from ..context import RunContext
from ..errors import InvalidConfig, ToolMissing

log = logging.getLogger("qjob_runner.quantize")


def _mtq():
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as exc:
        raise ToolMissing(
            f"nvidia-modelopt is not importable in this image ({exc})",
            "use the qjob jobrunner image, or pip install nvidia-modelopt",
        ) from None
    return mtq


def build_quant_config(ctx: RunContext) -> dict[str, Any]:
    mtq = _mtq()
    q = ctx.config.quantization
    cfg = copy.deepcopy(getattr(mtq, MODELOPT_PRESETS[q.format]))
    entries = list(cfg.get("quant_cfg") or [{"quantizer_name": "*", "enable": False}])
    if q.kv_cache != KVCacheFormat.NONE:
        if ctx.task != ModelTask.CAUSAL_LM:
            raise InvalidConfig("a KV cache exists only in causal LMs", "set spec.quantization.kvCache to none")
        entries += copy.deepcopy(getattr(mtq, MODELOPT_KV_PRESETS[q.kv_cache])["quant_cfg"])
        cfg.setdefault("algorithm", "max")
    if q.algorithm:
        cfg["algorithm"] = q.algorithm  # ModelOpt accepts the method name; its defaults apply
    # Never quantize LayerNorm inputs: they carry the residual stream with its outliers, and a
    # per-tensor INT8 scale there collapsed all-MiniLM-L6-v2 to cosine 0.71 (0.98 without; see
    # tests/runner/test_encoder.py). TensorRT keeps normalisation in high precision anyway.
    # (RMSNorm is not nn.LayerNorm.)
    entries.append({"quantizer_name": "*", "parent_class": "nn.LayerNorm", "enable": False})
    for pattern in q.exclude_modules:
        entries.append({"quantizer_name": pattern if pattern.endswith("*") else f"{pattern}*", "enable": False})
    cfg["quant_cfg"] = entries
    return cfg


def check_ranks(ctx: RunContext) -> None:
    """Pre-flight (called by ``resolve``): across ranks, only calibrations whose result equals
    one process's (``MULTI_RANK_ALGORITHMS``)."""
    if not ctx.ranks.distributed:
        return
    fix = "set spec.resources.gpus to a number so the stage runs in one pod"
    q = ctx.config.quantization
    if q.auto_quantize is not None:
        raise InvalidConfig(
            f"autoQuantize is not calibrated across ranks ({ctx.ranks.describe()}): ModelOpt 0.47 has not "
            "validated its search under FSDP2",
            f"choose one spec.quantization.format, or {fix}",
        )
    if ctx.config.calibration.layerwise:
        raise InvalidConfig(
            f"layer-wise calibration runs in one process; this is {ctx.ranks.describe()} (ModelOpt 0.47 keeps "
            "no layer checkpoints across ranks: 'Layerwise calibration checkpointing is not supported in "
            "multi-process distributed jobs')",
            f"set spec.calibration.layerwise to false, or {fix}",
        )
    method = build_quant_config(ctx).get("algorithm") or "max"
    method = method.get("method", "max") if isinstance(method, dict) else method
    if method not in MULTI_RANK_ALGORITHMS:
        raise InvalidConfig(
            f"{method} calibration ({q.format.value}) is not calibrated across ranks ({ctx.ranks.describe()}): "
            "ModelOpt 0.47 chooses its AWQ scales from each rank's own data, so the shards could disagree",
            f"choose a format calibrated with {' or '.join(sorted(MULTI_RANK_ALGORITHMS))} (e.g. fp8, nvfp4, "
            f"int8_smoothquant), or {fix}",
        )


def with_layerwise(cfg: dict[str, Any], checkpoints: Path) -> dict[str, Any]:
    """One decoder layer at a time, a checkpoint per layer: an attempt that stops mid-way (killed,
    evicted, OOM) resumes at the layer after the last finished one (ModelOpt's
    ``layerwise_calib.detect_resume_point`` reads the folder's manifest)."""
    method = cfg.get("algorithm") or "max"
    algorithm = dict(method) if isinstance(method, dict) else {"method": method}
    algorithm["layerwise"] = {"enable": True, "checkpoint_dir": str(checkpoints)}
    return {**cfg, "algorithm": algorithm}


def layerwise_resume(ctx: RunContext, checkpoints: Path) -> None:
    """Record where layer-wise calibration starts: 0, or the layer after an earlier attempt's last."""
    from modelopt.torch.quantization.utils.layerwise_calib import detect_resume_point

    found = detect_resume_point(str(checkpoints))
    start = found[0] if found else 0
    ctx.metrics["layerwise"] = {"checkpoints": str(checkpoints), "start_layer": start}
    if start:
        layers = found[1].get("num_layers")
        ctx.notes.append(f"layer-wise calibration resumed at layer {start} of {layers} ({checkpoints})")
        ctx.reporter.update(message=f"resuming layer-wise calibration at layer {start} of {layers}")


# ------------------------------------------------------------------------------ resume support


def state_key(ctx: RunContext, quant_config: dict[str, Any]) -> str:
    import importlib.metadata

    m = ctx.config.model
    folder = ctx.paths.model_dir
    ident = {
        "model": m.path or f"{m.hf_repo}@{m.revision}",
        "model_config": hashlib.sha256((folder / "config.json").read_bytes()).hexdigest() if folder else None,
        "dtype": m.dtype,
        "quant": quant_config,
        "auto_quantize": ctx.config.quantization.auto_quantize.model_dump(mode="json")
        if ctx.config.quantization.auto_quantize
        else None,
        "calibration": {"source": ctx.data.source, "samples": ctx.data.num_samples, "seq": ctx.data.sequence_length},
        "modelopt": importlib.metadata.version("nvidia-modelopt"),
        "format": resume_state.STATE_FORMAT,
    }
    return hashlib.sha256(json.dumps(_canonical(ident), sort_keys=True, default=str).encode()).hexdigest()[:20]


def _canonical(obj: Any) -> Any:
    """JSON-able with string keys (ModelOpt block_sizes mix int and str keys)."""
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    return obj


def _fingerprints(model) -> dict[str, tuple[float, float]]:
    """Cheap per-parameter checksums, to find the weights calibration rescaled (SmoothQuant, AWQ)."""
    import torch

    out = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            # float32 accumulation inside the reduction kernels: no float32 copy of the weights
            f = p.detach()
            out[name] = torch.stack([f.sum(dtype=torch.float32), torch.linalg.vector_norm(f, dtype=torch.float32)])
    return {k: tuple(v.tolist()) for k, v in out.items()}


def _snapshot(tensors: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[Any, Any]]]:
    """Copies of ``tensors`` that later in-place writes (the export packs weights) cannot touch.

    A GPU's tensors are cloned on that GPU when it has room for them twice over: a device copy
    takes milliseconds, where copying AWQ's rescaled weights (most of an 8B model, ~14 GB) to
    host memory held the run for seconds. Returns the copies and one CUDA event per GPU that
    marks when its clones are complete; without room the copy goes to the host here, as before.
    """
    import torch

    need: dict[Any, int] = {}
    for t in tensors.values():
        if t.is_cuda:
            need[t.device] = need.get(t.device, 0) + t.numel() * t.element_size()
    on_gpu = {d for d, n in need.items() if torch.cuda.mem_get_info(d)[0] > 2 * n + (1 << 30)}
    copies = {
        k: v.detach().clone() if v.is_cuda and v.device in on_gpu else v.detach().to("cpu", copy=True)
        for k, v in tensors.items()
    }
    events = []
    for d in on_gpu:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(d))
        events.append((d, ev))
    return copies, events


def _to_host(copies: dict[str, Any], events: list[tuple[Any, Any]]) -> dict[str, Any]:
    """Move GPU clones to the host on a side stream (overlapping the export), freeing each at once."""
    import torch

    streams = {}
    for device, ev in events:
        stream = torch.cuda.Stream(device=device)
        stream.wait_event(ev)
        streams[device] = stream
    out = {}
    for k in list(copies):
        t = copies.pop(k)
        if t.is_cuda:
            with torch.cuda.stream(streams[t.device]):
                t = t.to("cpu")  # a synchronous copy: the clone may be freed right after
        out[k] = t
    return out


class DeferredState:
    """Calibrated state that holds rescaled weights, written only if a later step fails.

    AWQ and SmoothQuant rescale most of the model's weights (14 GB at 8B). Copying them to the
    host right after calibration held the run for 8.5 s on the lent H200; copying them in the
    background slowed ModelOpt's export from 0.8 s to 10.9 s (both measured,
    benchmarks/results/runner_gpu_h200.json). A run that succeeds needs no resume state, so the
    snapshot (on the GPU where it has room) is kept until the run's end: a failing step writes
    it (``persist``), the report step drops it (``discard``). A pod killed outright during
    export loses it and calibrates again.
    """

    def __init__(self, write):
        self._write = write

    def join(self, timeout: float | None = None) -> None:
        """Background-work interface of ``ctx.background``: nothing runs until ``persist``."""

    def persist(self) -> None:
        write, self._write = self._write, None
        if write is not None:
            write()

    def discard(self) -> None:
        self._write = None  # frees the snapshot


def save_state(ctx: RunContext, key: str, before: dict[str, tuple[float, float]]) -> threading.Thread | DeferredState:
    """Snapshot ModelOpt state + calibrated tensors now; write quantizer-only states in the
    background, keep states with rescaled weights for a failure (``DeferredState``)."""
    import modelopt.torch.opt as mto

    after = _fingerprints(ctx.model)
    changed = {k for k, v in after.items() if before.get(k) != v}
    sd = ctx.model.state_dict()
    copies, events = _snapshot({k: v for k, v in sd.items() if "_quantizer" in k or k in changed})
    modelopt_state = mto.modelopt_state(ctx.model)

    def write():
        try:
            keep = _to_host(copies, events)
            path = resume_state.save(ctx.paths.work_dir, ctx.config.job_uid, key, modelopt_state, keep)
            log.info("saved calibrated state (%d tensors, %d rescaled weights) to %s", len(keep), len(changed), path)
        except Exception:  # noqa: BLE001 - resume state is an optimisation; never fail the run
            log.exception("could not save calibrated state to %s", ctx.paths.work_dir)

    if changed:
        return DeferredState(write)
    t = threading.Thread(target=write, name="qjob-save-state", daemon=True)
    t.start()
    return t


def restore_state(ctx: RunContext, key: str) -> bool:
    import modelopt.torch.opt as mto

    try:
        state, tensors = resume_state.load(ctx.paths.work_dir, ctx.config.job_uid, key)
        mto.restore_from_modelopt_state(ctx.model, state)
        missing, unexpected = ctx.model.load_state_dict(tensors, strict=False)
        if unexpected or any("_quantizer" in k for k in missing):
            raise RuntimeError(f"state does not match the model (unexpected {unexpected[:3]}, missing {missing[:3]})")
        return True
    except Exception as exc:  # noqa: BLE001
        log.warning("ignoring unusable calibrated state in %s: %s", ctx.paths.work_dir, exc)
        return False


# ------------------------------------------------------------------------------ quantization


def forward_loop_factory(ctx: RunContext):
    import torch

    from .data import forward_kwargs

    batches = ctx.data.batches
    total = len(batches)
    reporter = ctx.reporter

    def forward_loop(model) -> None:
        start = time.monotonic()
        extra = forward_kwargs(model)
        with torch.no_grad():
            for i, batch in enumerate(batches, 1):
                model(**batch, **extra)
                elapsed = time.monotonic() - start
                # AWQ/SmoothQuant call the loop more than once; progress is per pass.
                reporter.update(
                    step="calibrate", message=f"calibration batch {i}/{total}", eta_seconds=elapsed / i * (total - i)
                )

    return forward_loop


def auto_quantize(ctx: RunContext) -> dict[str, Any]:
    mtq = _mtq()
    aq = ctx.config.quantization.auto_quantize
    if ctx.task != ModelTask.CAUSAL_LM:
        raise InvalidConfig(
            "autoQuantize scores layers by the language-model loss and needs a causal LM",
            "use spec.quantization.format for encoders",
        )
    formats = [MODELOPT_PRESETS[f] for f in aq.formats]
    batches = ctx.data.batches

    def forward_step(model, batch):
        return model(**batch, labels=batch["input_ids"])

    def loss_func(output, batch):
        return output.loss

    disabled = list(ctx.config.quantization.exclude_modules) or None
    ckpt = ctx.paths.work_dir / f"auto_quantize_search-{ctx.config.job_uid}.pt"  # ModelOpt loads it weights_only
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    model, search = mtq.auto_quantize(
        ctx.model,
        constraints={"effective_bits": aq.effective_bits},
        quantization_formats=formats,
        data_loader=batches,
        forward_step=forward_step,
        loss_func=loss_func,
        disabled_layers=disabled,
        num_calib_steps=len(batches),
        num_score_steps=min(len(batches), 128),
        checkpoint=str(ckpt),
    )
    ctx.model = model
    kv = ctx.config.quantization.kv_cache
    if kv != KVCacheFormat.NONE:
        from modelopt.torch.quantization.conversion import set_quantizer_by_cfg

        set_quantizer_by_cfg(ctx.model, getattr(mtq, MODELOPT_KV_PRESETS[kv])["quant_cfg"])
        mtq.calibrate(ctx.model, algorithm="max", forward_loop=forward_loop_factory(ctx))
    best = search.get("best", {}) if isinstance(search, dict) else {}
    ctx.metrics["auto_quantize"] = {
        "effective_bits_target": aq.effective_bits,
        "candidates": formats,
        "is_satisfied": best.get("is_satisfied"),
    }
    return {"auto_quantize": {"effective_bits": aq.effective_bits, "formats": formats}}


def run(ctx: RunContext) -> None:
    import torch

    mtq = _mtq()
    q = ctx.config.quantization
    quant_config = build_quant_config(ctx) if q.format else {"auto_quantize": q.auto_quantize.model_dump(mode="json")}
    layerwise = bool(q.format and ctx.config.calibration.layerwise)
    key = state_key(ctx, {**quant_config, "layerwise": layerwise})
    if layerwise:  # the checkpoints of this job and config only: another config starts afresh
        checkpoints = ctx.paths.work_dir / "layerwise" / f"{ctx.config.job_uid}-{key}"
        quant_config = with_layerwise(quant_config, checkpoints)
        layerwise_resume(ctx, checkpoints)
    ctx.quant_config = quant_config
    state_path, _ = resume_state.paths(ctx.paths.work_dir, ctx.config.job_uid, key)
    # Sharded over ranks, the calibrated state is not one process's to save: a retry resumes
    # from the layer-wise checkpoints instead (spec.calibration.layerwise).
    keep_state = not ctx.ranks.distributed
    if keep_state:
        ctx.metrics["state_file"] = str(state_path)
    if q.format and keep_state and state_path.exists():
        ctx.reporter.update(step="quantize", message=f"restoring calibrated state from {state_path.name}")
        if restore_state(ctx, key):
            ctx.resumed = True
            ctx.notes.append(f"calibration skipped: restored {state_path}")
            ctx.reporter.update(message="calibration skipped (restored from an earlier attempt)")
            return
    t0 = time.monotonic()
    if q.format:
        before = _fingerprints(ctx.model) if keep_state else {}
        ctx.reporter.update(step="calibrate", message=f"calibrating {q.format.value} with {MODELOPT_PRESETS[q.format]}")
        try:
            ctx.model = mtq.quantize(ctx.model, quant_config, forward_loop_factory(ctx))
        except RuntimeError as exc:
            if "no weight quantizer is enabled" in str(exc):
                raise InvalidConfig(
                    f"{MODELOPT_PRESETS[q.format]} enabled no weight quantizer in {type(ctx.model).__name__}",
                    "check spec.quantization.excludeModules (the patterns may exclude every layer), or this "
                    "architecture's layers are custom modules ModelOpt cannot quantize",
                ) from None
            raise
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ctx.metrics["calibration_seconds"] = time.monotonic() - t0
        if keep_state:
            ctx.background.append(save_state(ctx, key, before))
    else:
        ctx.reporter.update(
            step="calibrate", message=f"AutoQuantize to {q.auto_quantize.effective_bits} effective bits"
        )
        ctx.quant_config = auto_quantize(ctx)
        ctx.metrics["calibration_seconds"] = time.monotonic() - t0
    enabled = sum(
        1 for n, m in ctx.model.named_modules() if n.endswith("_quantizer") and getattr(m, "is_enabled", False)
    )
    ctx.metrics["enabled_quantizers"] = enabled
    if enabled == 0:
        raise InvalidConfig(
            "quantization enabled no quantizer in this model",
            "check spec.quantization.excludeModules: the patterns exclude every layer",
        )
