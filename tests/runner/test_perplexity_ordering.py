"""Perplexity delta on a small causal LM trained inside the test: aggressive formats cost more."""

from __future__ import annotations

import pytest

from qjob_api.runner import RunnerConfig
from qjob_runner import run

from .helpers import runner_config

pytestmark = pytest.mark.slow


def test_perplexity_ordering(trained_llama, calib_jsonl, tmp_path):
    deltas = {}
    for fmt in ["fp8", "int8_smoothquant", "int4_awq"]:
        cfg = RunnerConfig.model_validate(runner_config(
            model={"path": str(trained_llama)}, quantization={"format": fmt},
            calibration={"dataset": {"path": str(calib_jsonl)}, "samples": 32, "sequenceLength": 128},
            evaluation={"samples": 16, "gate": {"maxPerplexityIncrease": 0.5}}, outputDir=str(tmp_path / fmt)))
        r = run(cfg)
        assert r.outcome == "Succeeded", r.message
        assert r.quality.gate_passed is True
        deltas[fmt] = r.quality.degradation
        base = r.quality.baseline
    print(f"\nbaseline perplexity {base:.2f}; relative increase: " + ", ".join(f"{k} {v:+.2%}" for k, v in deltas.items()))
    assert base < 200, "the test model did not learn anything"  # vocab 512: random would be ~512
    # 8-bit formats cost less than 4-bit weights
    assert max(deltas["fp8"], deltas["int8_smoothquant"]) < deltas["int4_awq"]
    assert abs(deltas["fp8"]) < 0.05
