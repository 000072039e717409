"""build-<arch>: engines on a node of the target architecture, from the quantize stage's output.

Encoders: a TensorRT engine from ``onnx/model.onnx`` through the TensorRT Python API, strongly
typed (precision comes from the Q/DQ nodes; TensorRT 11 has no other mode), with a timing cache
kept in ``work_dir`` per compute capability and TensorRT version.

Causal LMs: TensorRT-LLM 1.3 has no TensorRT-engine backend any more; its PyTorch backend loads
the ModelOpt unified checkpoint directly. Where ``trtllm-build`` exists (TensorRT-LLM <= 1.2) and
a legacy ``tensorrt_llm`` checkpoint was exported, we build an engine; otherwise we validate the
``hf`` checkpoint with ``LLM(model=dir)``: load, generate, measure throughput on this GPU.
TensorRT-LLM runs in a subprocess, optionally with its own interpreter (``QJOB_TRTLLM_PYTHON``),
because its pinned torch/transformers differ from the quantization environment's.

Every engine is tagged with the compute capability and the TensorRT (or TensorRT-LLM) version that
built it: an engine only runs there.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from qjob_api.capabilities import architecture_of

from ..context import RunContext
from ..errors import InvalidConfig, InvalidInput, ToolMissing, TransientError
from ..registration import register

log = logging.getLogger("qjob_runner.build")

TRTLLM_PYTHON_ENV = "QJOB_TRTLLM_PYTHON"


def gpu_capability(ctx: RunContext) -> tuple[int, int]:
    import torch

    if not torch.cuda.is_available():
        raise TransientError(
            "the build stage sees no CUDA GPU",
            "the pod must run on a GPU node with nvidia.com/gpu allocated; "
            "it is retried (check the node's device plugin)",
        )
    major, minor = torch.cuda.get_device_capability(0)
    arch = architecture_of(major, minor)
    want = ctx.config.engine.architecture  # type: ignore[union-attr]
    if arch != want:
        raise InvalidConfig(
            f"this pod runs on compute capability {major}.{minor} ({arch.value if arch else 'unknown'}) "
            f"but builds for {want.value}",
            "an engine only runs on the architecture that built it: fix the node labels "
            "(nvidia.com/gpu.compute.major/minor) or the operator's architecture label settings",
        )
    return major, minor


def build_tensorrt(ctx: RunContext, onnx_path: Path, out_dir: Path, cc: tuple[int, int]) -> dict:
    try:
        import tensorrt as trt
    except ImportError:
        raise ToolMissing(
            "TensorRT is not installed in this image (import tensorrt failed)",
            "use the qjob jobrunner image (it pins tensorrt), or remove spec.engines to export ONNX only",
        ) from None
    engine = ctx.config.engine
    io = (
        json.loads((onnx_path.parent / "onnx_io.json").read_text())
        if (onnx_path.parent / "onnx_io.json").exists()
        else {}
    )
    max_seq = min(engine.max_sequence_length, int(io.get("max_position_embeddings") or engine.max_sequence_length))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InvalidInput(
            f"TensorRT {trt.__version__} cannot parse {onnx_path}: {errors[:800]}",
            "re-run the quantize stage with this image's ModelOpt, or report the unsupported operator",
        )
    config = builder.create_builder_config()
    config.builder_optimization_level = engine.optimization_level
    cache_file = ctx.paths.work_dir / f"timing-sm{cc[0]}{cc[1]}-trt{trt.__version__}.cache"
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        opt = (max(1, engine.max_batch_size // 2), min(128, max_seq))
        profile.set_shape(name, (1, 1), opt, (engine.max_batch_size, max_seq))
    config.add_optimization_profile(profile)
    t0 = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise InvalidInput(
            f"TensorRT {trt.__version__} failed to build an engine from {onnx_path} (see the log above)",
            "lower spec.engines[].maxSequenceLength/maxBatchSize, or check the ONNX Q/DQ placement",
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "model.plan").write_bytes(bytes(serialized))
    ctx.paths.work_dir.mkdir(parents=True, exist_ok=True)
    cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {
        "engine": "tensorrt",
        "tensorrt_version": trt.__version__,
        "build_seconds": round(time.monotonic() - t0, 3),
        "max_batch_size": engine.max_batch_size,
        "max_sequence_length": max_seq,
        "optimization_level": engine.optimization_level,
        "strongly_typed": True,
        "timing_cache": str(cache_file),
    }


TRTLLM_SCRIPT = r"""
import json, sys, time
cfg = json.loads(sys.argv[1])
import tensorrt_llm
from tensorrt_llm import LLM, SamplingParams
llm = LLM(model=cfg["model"], max_batch_size=cfg["max_batch_size"], max_seq_len=cfg["max_seq_len"])
prompts = ["The capital of France is", "Quantization reduces", "def fibonacci(n):", "Kubernetes operators"]
prompts *= max(1, cfg["max_batch_size"] // 4)
sp = SamplingParams(max_tokens=cfg["max_tokens"], temperature=0.0)
llm.generate(prompts[:1], sp)
t0 = time.time(); outs = llm.generate(prompts, sp); dt = time.time() - t0
tokens = sum(len(o.outputs[0].token_ids) for o in outs)
print("QJOB_RESULT " + json.dumps({
    "engine": "tensorrt_llm", "mode": "llm_api_validation", "tensorrt_llm_version": tensorrt_llm.__version__,
    "prompts": len(prompts), "generated_tokens": tokens, "seconds": dt, "tokens_per_second": tokens / dt,
    "sample": outs[0].outputs[0].text[:200]}))
"""


def trtllm_python() -> str | None:
    py = os.environ.get(TRTLLM_PYTHON_ENV)
    if py:
        return py
    try:
        import importlib.util

        return sys.executable if importlib.util.find_spec("tensorrt_llm") else None
    except (ImportError, ValueError):
        return None


def build_trtllm(ctx: RunContext, out_dir: Path) -> dict:
    py = trtllm_python()
    if py is None:
        raise ToolMissing(
            "TensorRT-LLM is not installed in this image",
            f"use the qjob jobrunner image (it carries TensorRT-LLM; {TRTLLM_PYTHON_ENV} points at its Python), "
            "or remove spec.engines to export the checkpoint only",
        )
    engine = ctx.config.engine
    legacy = ctx.paths.output_dir / "tensorrt_llm"
    out_dir.mkdir(parents=True, exist_ok=True)
    trtllm_build = shutil.which("trtllm-build", path=str(Path(py).parent) + os.pathsep + os.environ.get("PATH", ""))
    if legacy.is_dir() and trtllm_build:
        cmd = [
            trtllm_build,
            "--checkpoint_dir",
            str(legacy),
            "--output_dir",
            str(out_dir / "engine"),
            "--max_batch_size",
            str(engine.max_batch_size),
            "--max_seq_len",
            str(engine.max_sequence_length),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise InvalidInput(
                f"trtllm-build failed: {proc.stderr[-800:]}", "check that this TensorRT-LLM version supports the format"
            )
        info = {"engine": "tensorrt_llm", "mode": "trtllm-build"}
    else:
        args = json.dumps(
            {
                "model": str(ctx.paths.output_dir / "hf"),
                "max_batch_size": engine.max_batch_size,
                "max_seq_len": engine.max_sequence_length,
                "max_tokens": 32,
            }
        )
        proc = subprocess.run([py, "-c", TRTLLM_SCRIPT, args], capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("QJOB_RESULT ")), None)
        if proc.returncode != 0 or line is None:
            tail = (proc.stderr or proc.stdout)[-1200:]
            if "out of memory" in tail.lower():
                raise TransientError(
                    f"TensorRT-LLM ran out of GPU memory: {tail[-300:]}", "lower maxBatchSize/maxSequenceLength"
                )
            raise InvalidInput(
                f"TensorRT-LLM could not load the exported checkpoint: {tail}",
                "check the format is supported on this architecture by this TensorRT-LLM version",
            )
        info = json.loads(line.removeprefix("QJOB_RESULT "))
    (out_dir / "validation.json").write_text(json.dumps(info, indent=2))
    return info


def run(ctx: RunContext) -> None:
    assert ctx.config.engine is not None and ctx.staging is not None
    cc = gpu_capability(ctx)
    arch = ctx.config.engine.architecture.value
    onnx_path = ctx.paths.output_dir / "onnx" / "model.onnx"
    hf_dir = ctx.paths.output_dir / "hf"
    if not (ctx.paths.output_dir / "manifest.json").exists():
        raise InvalidInput(
            f"{ctx.paths.output_dir} holds no finished quantize stage (no manifest.json)",
            "run the quantize stage first; the build reads its artifacts from the same output folder",
        )
    out = ctx.staging.path
    ctx.reporter.update(step="build", message=f"building for {arch} (sm{cc[0]}{cc[1]})")
    if onnx_path.exists():
        info = build_tensorrt(ctx, onnx_path, out, cc)
        version = info["tensorrt_version"]
    elif hf_dir.is_dir():
        info = build_trtllm(ctx, out)
        version = info.get("tensorrt_llm_version", "")
    else:
        raise InvalidInput(
            f"{ctx.paths.output_dir} has neither onnx/model.onnx nor hf/", "export onnx (encoders) or hf (LLMs)"
        )
    info.update({"architecture": arch, "compute_capability": f"{cc[0]}.{cc[1]}"})
    (out / "build_info.json").write_text(json.dumps(info, indent=2))
    ctx.metrics["build"] = info
    relative = f"engines/{arch}"
    kind_format = "tensorrt" if info["engine"] == "tensorrt" else "tensorrt_llm"
    ctx.engine_entry = register(
        ctx,
        kind_format,
        out,
        relative,
        kind="engine",
        format=kind_format,
        architecture=arch,
        compute_capability=f"{cc[0]}.{cc[1]}",
        tensorrt_version=version,
    )
