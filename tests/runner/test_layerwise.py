"""Layer-wise calibration (the re-plan after an OOM may turn it on): per-layer checkpoints in
the work folder, which ModelOpt's detect_resume_point reads to resume at the last finished layer."""

from __future__ import annotations

import json

from qjob_api.runner import RunnerConfig
from qjob_runner.pipeline import run

from .helpers import runner_config


def test_layerwise_calibration_checkpoints_every_layer(tiny_llama, calib_jsonl, tmp_path):
    from modelopt.torch.quantization.utils.layerwise_calib import detect_resume_point

    cfg = runner_config(
        model={"path": str(tiny_llama)},
        calibration={"dataset": {"path": str(calib_jsonl)}, "layerwise": True},
        evaluation={"enabled": False},
        outputDir=str(tmp_path / "out"),
    )
    result = run(RunnerConfig.model_validate(cfg))
    assert result.outcome == "Succeeded", result.message
    checkpoints = tmp_path / "out" / ".qjob-work" / "layerwise"
    assert sorted(p.name for p in checkpoints.glob("layer_*")) == ["layer_0000", "layer_0001"]
    manifest = json.loads((checkpoints / "manifest.json").read_text())
    assert (manifest["last_completed_layer"], manifest["num_layers"]) == (1, 2)
    assert detect_resume_point(str(checkpoints)) is None  # complete: nothing to resume

    # An attempt stopped after layer 0 resumes at layer 1.
    manifest["last_completed_layer"] = 0
    (checkpoints / "manifest.json").write_text(json.dumps(manifest))
    start, _ = detect_resume_point(str(checkpoints))
    assert start == 1
