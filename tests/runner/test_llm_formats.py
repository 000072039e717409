"""Tiny Llama through every CPU-capable format; the exported checkpoint reloads and matches."""

from __future__ import annotations

import json

import pytest
import torch
from qjob_api.runner import RunnerConfig
from qjob_runner import run
from qjob_runner.checkpoint import load_dequantized

from .helpers import runner_config

pytestmark = pytest.mark.slow

#: Relative logit error of the reloaded checkpoint vs the fake-quantized model. Max-calibrated
#: formats export exactly what was simulated; AWQ formats are re-smoothed at export (q/k/v and
#: gate/up share one pre_quant_scale, folded into the RMSNorm weight) and requantized, which moves
#: the random-weight tiny model's logits by ~10-15% (same size as the quantization error itself).
TOLERANCE = {"int8": 1e-3, "int8_smoothquant": 1e-2, "fp8": 1e-2, "int4_awq": 0.25, "w4a8_awq": 0.25}


@pytest.mark.parametrize("fmt", ["int8", "int8_smoothquant", "fp8", "int4_awq", "w4a8_awq"])
def test_format_exports_a_checkpoint_that_reloads(fmt, tiny_llama, calib_jsonl, tmp_path, monkeypatch):
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("QJOB_VERIFY_EXPORT", "1")
    out = tmp_path / "out"
    cfg = RunnerConfig.model_validate(
        runner_config(
            model={"path": str(tiny_llama)},
            quantization={"format": fmt, "kvCache": "fp8"},
            calibration={"dataset": {"path": str(calib_jsonl)}},
            outputDir=str(out),
        )
    )
    result = run(cfg)
    assert result.outcome == "Succeeded", result.message
    assert {a.kind for a in result.artifacts} == {"checkpoint", "manifest"}
    hf = out / "hf"
    qcfg = json.loads((hf / "hf_quant_config.json").read_text())["quantization"]
    assert qcfg["kv_cache_quant_algo"] == "FP8"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["artifacts"][0]["sha256"]
    assert manifest["versions"]["nvidia-modelopt"] and manifest["versions"]["transformers"]
    # Reference: the same preset applied to the same model in-process (fake quantization).
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    texts = [json.loads(x)["text"] for x in calib_jsonl.read_text().splitlines()[:16]]
    tok.padding_side = "left"
    batches = [
        tok(texts[i : i + 4], return_tensors="pt", padding=True, truncation=True, max_length=64)
        for i in range(0, 16, 4)
    ]
    preset = {
        "int8": "INT8_DEFAULT_CFG",
        "int8_smoothquant": "INT8_SMOOTHQUANT_CFG",
        "fp8": "FP8_DEFAULT_CFG",
        "int4_awq": "INT4_AWQ_CFG",
        "w4a8_awq": "W4A8_AWQ_BETA_CFG",
    }[fmt]
    mtq.quantize(model, getattr(mtq, preset), lambda m: [m(**b) for b in batches])
    x = tok(texts[:2], return_tensors="pt", padding=True, truncation=True, max_length=64)
    with torch.no_grad():
        want = model(**x).logits
        reloaded = load_dequantized(hf)
        got = reloaded(**x).logits
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < TOLERANCE[fmt], f"{fmt}: reloaded checkpoint differs from the quantized model by {rel:.4f}"
    # The runner's own check of the export: reloaded perplexity ~ fake-quant perplexity.
    ratio = manifest["metrics"]["hf_check"]["reloaded_vs_quantized_perplexity_ratio"]
    assert abs(ratio - 1) < (0.002 if fmt in {"int8", "fp8"} else 0.05), ratio
    # Plain transformers cannot read modelopt weights (it warns and loads int8 as float): the
    # config says so, which is why checkpoint.load_dequantized exists.
    assert json.loads((hf / "config.json").read_text())["quantization_config"]["quant_method"] == "modelopt"


def test_auto_quantize_effective_bits(tiny_llama, calib_jsonl, tmp_path):
    out = tmp_path / "out"
    cfg = RunnerConfig.model_validate(
        runner_config(
            model={"path": str(tiny_llama)},
            quantization={"format": None, "autoQuantize": {"effectiveBits": 6.0, "formats": ["fp8", "int4_awq"]}},
            calibration={"dataset": {"path": str(calib_jsonl)}, "samples": 8},
            outputDir=str(out),
        )
    )
    result = run(cfg)
    assert result.outcome == "Succeeded", result.message
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["auto_quantize"]["effective_bits_target"] == 6.0
    assert (out / "hf" / "hf_quant_config.json").exists()
