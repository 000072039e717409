"""Every CPU-capable format is exported for real and its hf_quant_config.json compared with the
serving table: a ModelOpt upgrade that writes other metadata fails here. The runner then judges
the written metadata per runtime (artifact runtimes, serve commands, refusals)."""

from __future__ import annotations

import json

import pytest
from qjob_api.capabilities import (
    CUDA_ONLY_FORMATS,
    HF_KV_CACHE,
    HF_QUANTIZATION,
    RUNTIMES,
    KVCacheFormat,
    QuantFormat,
    version_key,
)
from qjob_api.runner import ExitCode, RunnerConfig
from qjob_runner import run
from qjob_runner.context import Paths, RunContext
from qjob_runner.errors import InvalidConfig
from qjob_runner.reporting import make_reporter
from qjob_runner.steps import serving

from .helpers import runner_config

pytestmark = pytest.mark.slow

CPU_FORMATS = [f for f in QuantFormat if f not in CUDA_ONLY_FORMATS]


def _run(tmp_path, model, calib, **over):
    out = tmp_path / "out"
    cfg = runner_config(
        model={"path": str(model)},
        calibration={"dataset": {"path": str(calib)}, "samples": 8},
        evaluation={"enabled": False},
        outputDir=str(out),
        **over,
    )
    return run(RunnerConfig.model_validate(cfg)), out


@pytest.mark.parametrize("fmt", CPU_FORMATS, ids=lambda f: f.value)
def test_exported_metadata_is_the_tables(fmt, tiny_llama, calib_jsonl, tmp_path):
    kv = KVCacheFormat.FP8
    result, out = _run(tmp_path, tiny_llama, calib_jsonl, quantization={"format": fmt.value, "kvCache": kv.value})
    assert result.outcome == "Succeeded", result.message
    written = json.loads((out / "hf" / "hf_quant_config.json").read_text())["quantization"]
    table = HF_QUANTIZATION[fmt]
    assert written["quant_algo"] == table.quant_algo
    assert written.get("group_size") == table.group_size
    assert written["kv_cache_quant_algo"] == HF_KV_CACHE[kv]
    assert isinstance(written["exclude_modules"], list) and "lm_head" in written["exclude_modules"]

    # The checkpoint lists exactly the runtimes whose row has the format and the KV cache.
    [checkpoint] = [a for a in result.artifacts if a.kind == "checkpoint"]
    loaders = [rt for rt in RUNTIMES.values() if fmt in rt.formats and kv in rt.kv_caches]
    assert [t.name for t in checkpoint.runtimes] == [rt.name.value for rt in loaders]
    for target, rt in zip(checkpoint.runtimes, loaders, strict=True):
        cells = (rt.formats[fmt], rt.kv_caches[kv])
        assert target.min_version == max((c.min_version for c in cells), key=version_key)
        assert set(target.architectures) == {a.value for a in cells[0].architectures & cells[1].architectures}
        assert target.command == rt.serve_command(str(out / "hf"), fmt)
    manifest = json.loads((out / "manifest.json").read_text())
    [entry] = [e for e in manifest["artifacts"] if e["name"] == "hf"]
    assert entry["runtimes"] == [t.to_api() for t in checkpoint.runtimes]


def test_every_runtime_asked_for_and_all_load_it(tiny_llama, calib_jsonl, tmp_path):
    serving = {"runtimes": [{"name": "tensorrt-llm", "minVersion": "1.2"}, {"name": "vllm"}, {"name": "sglang"}]}
    result, out = _run(tmp_path, tiny_llama, calib_jsonl, quantization={"format": "fp8"}, serving=serving)
    assert result.outcome == "Succeeded", result.message
    [checkpoint] = [a for a in result.artifacts if a.kind == "checkpoint"]
    commands = {t.name: t.command for t in checkpoint.runtimes}
    assert commands == {
        "tensorrt-llm": f"trtllm-serve {out / 'hf'}",
        "vllm": f"vllm serve {out / 'hf'} --quantization modelopt",
        "sglang": f"python -m sglang.launch_server --model-path {out / 'hf'} --quantization modelopt",
    }


def test_unloadable_format_is_refused_before_calibration(tiny_llama, calib_jsonl, tmp_path):
    result, out = _run(
        tmp_path, tiny_llama, calib_jsonl, quantization={"format": "int4_awq"}, serving={"runtimes": [{"name": "vllm"}]}
    )
    assert result.exit_code == ExitCode.INVALID_CONFIG and result.failed_step == "resolve"
    assert result.message.startswith("vLLM cannot load int4_awq checkpoints from ModelOpt: choose fp8")
    assert not (out / "hf").exists()


def test_serving_step_refuses_a_written_checkpoint_the_runtime_cannot_load(tiny_llama, calib_jsonl, tmp_path):
    """The serving step reads what ModelOpt really wrote: an INT4 AWQ checkpoint (exported with no
    runtime asked for) judged for a job that asks for vLLM fails with InvalidConfig naming both
    (the pre-flight check refuses such a job earlier; this is the guard when the two disagree)."""
    result, out = _run(tmp_path, tiny_llama, calib_jsonl, quantization={"format": "int4_awq"})
    assert result.outcome == "Succeeded", result.message
    config = RunnerConfig.model_validate(
        runner_config(
            model={"path": str(tiny_llama)},
            quantization={"format": "int4_awq"},
            calibration={"dataset": {"path": str(calib_jsonl)}},
            serving={"runtimes": [{"name": "vllm"}]},
            outputDir=str(out),
        )
    )
    ctx = RunContext(
        config=config, paths=Paths.from_config(config), reporter=make_reporter(config.reporting, "quantize")
    )
    ctx.staged["hf"] = out / "hf"
    with pytest.raises(InvalidConfig) as refused:
        serving.run(ctx)
    assert refused.value.exit_code == ExitCode.INVALID_CONFIG
    message = str(refused.value)
    assert "the exported int4_awq checkpoint cannot be served as asked" in message
    assert "hf_quant_config.json says quant_algo W4A16_AWQ" in message and "group_size 128" in message
    assert "vLLM does not load quant_algo W4A16_AWQ" in message
    assert ctx.serving_targets == {}
