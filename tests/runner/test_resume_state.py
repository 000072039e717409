"""Resume state is data only and belongs to one job: a file planted on the output claim never runs
code in the runner, and one job never restores another job's calibration."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from unittest import mock

import pytest
import torch
from qjob_api.runner import RunnerConfig
from qjob_runner import resume_state, run

from .helpers import runner_config


class _Payload:
    """Unpickling this runs a command: what an attacker plants."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _config(out: Path, model: Path, data: Path, uid: str) -> RunnerConfig:
    return RunnerConfig.model_validate(
        runner_config(
            model={"path": str(model)},
            quantization={"format": "fp8"},
            calibration={"dataset": {"path": str(data)}},
            outputDir=str(out),
            jobUid=uid,
        )
    )


def _interrupted_run(cfg: RunnerConfig) -> None:
    with mock.patch("qjob_runner.steps.export.export_hf", side_effect=ConnectionResetError("node drained")):
        assert run(cfg).exit_code == 75


@pytest.mark.slow
def test_planted_pickle_in_the_work_dir_never_runs(tmp_path, tiny_llama, calib_jsonl):
    out, marker = tmp_path / "out", tmp_path / "pwned"
    cfg = _config(out, tiny_llama, calib_jsonl, uid="0b7c5e2a-1111-4c3e-9d7a-5f0e2d9c1a01")
    _interrupted_run(cfg)
    work = out / ".qjob-work"
    saved = list(work.iterdir())
    assert saved, "the first attempt saved no resume state"
    # Overwrite every state file, and plant a pickle under every name a loader could look for.
    evil = pickle.dumps(_Payload(marker))
    keys = {p.name.split(".")[0] for p in saved}
    for path in [*saved, *(work / f"{k}.pt" for k in keys), *(work / f"{k}.pth" for k in keys)]:
        path.write_bytes(evil)
    result = run(cfg)
    assert not marker.exists(), "the runner unpickled a planted file"
    assert result.outcome == "Succeeded", result.message
    assert "calibration skipped" not in (result.message or "")  # the planted state was refused


@pytest.mark.slow
def test_state_is_restored_only_by_the_job_that_wrote_it(tmp_path, tiny_llama, calib_jsonl):
    out = tmp_path / "out"
    mine = _config(out, tiny_llama, calib_jsonl, uid="7d1f0c9e-2222-4b7a-8c55-0a9e3f6b2c02")
    _interrupted_run(mine)
    [meta] = (out / ".qjob-work").glob("calibrated-*.json")
    assert mine.job_uid in meta.name and json.loads(meta.read_text())["jobUid"] == mine.job_uid
    # Another job writing to the same folder computes the same calibration key, yet does not restore.
    other = mine.model_copy(update={"job_uid": "9e2a4b6c-3333-4d1e-a7f3-6c8b0d2e4f03"})
    with mock.patch("modelopt.torch.quantization.quantize", side_effect=AssertionError("calibrated")):
        assert run(other).exit_code != 0  # it had to calibrate: nothing was borrowed
    # A copy relabelled as the other job's is refused by the uid recorded inside it.
    forged = meta.with_name(meta.name.replace(mine.job_uid, other.job_uid))
    forged.write_text(meta.read_text())
    tensors = meta.with_suffix(".safetensors")
    forged.with_suffix(".safetensors").write_bytes(tensors.read_bytes())
    key = meta.stem.split("-")[-1]
    with pytest.raises(resume_state.StateError, match="belongs to job"):
        resume_state.load(out / ".qjob-work", other.job_uid, key)
    # And the owner's own state is refused once its tensors change.
    tensors.write_bytes(tensors.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(resume_state.StateError, match="digest"):
        resume_state.load(out / ".qjob-work", mine.job_uid, key)


def test_state_round_trips_modelopt_types_and_refuses_others(tmp_path):
    state = {
        "modelopt_state_dict": [("quantize", {"config": {"num_bits": (4, 3), "block_sizes": {-1: 128, "type": "s"}}})],
        "shape": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
        "$weird": None,
    }
    tensors = {"a._amax": torch.ones(3), "b.weight": torch.arange(6.0).reshape(2, 3)}
    resume_state.save(tmp_path, "uid-1", "k1", state, tensors)
    restored, loaded = resume_state.load(tmp_path, "uid-1", "k1")
    assert restored == state
    assert torch.equal(loaded["b.weight"], tensors["b.weight"])
    with pytest.raises(TypeError, match="cannot store"):
        resume_state.encode({"fn": print})
    bad = json.loads((tmp_path / "calibrated-uid-1-k1.json").read_text())
    bad["modelopt_state"] = {"$dtype": "nn"}
    (tmp_path / "calibrated-uid-1-k1.json").write_text(json.dumps(bad))
    with pytest.raises(resume_state.StateError, match="dtype"):
        resume_state.load(tmp_path, "uid-1", "k1")
