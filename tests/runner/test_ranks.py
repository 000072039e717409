"""The runner as several torchrun ranks, for real: separate processes on CPU (gloo, MASTER_ADDR
127.0.0.1) load the tiny Llama sharded with FSDP2, calibrate on their shares of the batches and
export through ModelOpt's FSDP2 path; rank 0 alone publishes. Compared with one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from qjob_api.runner import ExitCode, RunnerConfig, RunnerResult
from qjob_dev.s3server import free_port

from .helpers import as_bytes, checkpoint_tensors, runner_config

#: The 2-rank checkpoint must match the single process's: max |a-b|/|a| of every scale tensor
#: (amax / format max: input_scale, weight_scale, k/v scales). Measured: 0 (bit-identical), as
#: the ranks see the very batches one process sees and amax is all-reduced by max.
SCALE_RTOL = 1e-6
WORLD = 2


def _config(tiny_llama, calib_jsonl, out: Path, **overrides) -> Path:
    calibration = {"dataset": {"path": str(calib_jsonl)}, **overrides.pop("calibration", {})}
    cfg = runner_config(model={"path": str(tiny_llama)}, calibration=calibration, outputDir=str(out), **overrides)
    path = out.parent / f"{out.name}.json"
    path.write_text(json.dumps(cfg))
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"}}
    env.update(QJOB_TORCH_THREADS="1", MASTER_ADDR="127.0.0.1", QJOB_RENDEZVOUS_TIMEOUT_SECONDS="60")
    env.update(extra)
    return env


def _rank(config: Path, rank: int, port: int, **extra: str) -> subprocess.Popen:
    """One runner process as torchrun would start it (RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    env = _env(
        **{"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD), "MASTER_PORT": str(port), **extra}
    )
    return subprocess.Popen(
        [sys.executable, "-m", "qjob_runner", "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _launch(config: Path, termination: Path, **extra: str) -> subprocess.CompletedProcess:
    """The pod's command in a multi-pod plan (``python -m qjob_runner.launch``), one node of WORLD GPUs."""
    env = _env(
        **{"NNODES": "1", "NPROC_PER_NODE": str(WORLD), "NODE_RANK": "0", "MASTER_PORT": str(free_port()), **extra}
    )
    env["QJOB_TERMINATION_LOG"] = str(termination)
    return subprocess.run(
        [sys.executable, "-m", "qjob_runner.launch", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs() / a.abs().clamp(min=1e-12)).max().item()


@pytest.mark.parametrize("fmt", ["fp8", "int8_smoothquant"])
def test_two_ranks_export_what_one_process_exports(fmt, tiny_llama, calib_jsonl, tmp_path):
    from qjob_runner.pipeline import run

    quantization = {"format": fmt}
    single_config = _config(tiny_llama, calib_jsonl, tmp_path / "single", quantization=quantization)
    single = run(RunnerConfig.model_validate_json(single_config.read_text()))
    assert single.outcome == "Succeeded", single.message

    termination = tmp_path / "termination-log"
    done = _launch(_config(tiny_llama, calib_jsonl, tmp_path / "ranks", quantization=quantization), termination)
    assert done.returncode == 0, done.stderr[-3000:]
    result = RunnerResult.model_validate_json(termination.read_text())
    assert result.outcome == "Succeeded" and "rendezvous" in result.step_seconds
    assert {a.kind for a in result.artifacts} == {"checkpoint", "manifest"}

    one, two = checkpoint_tensors(tmp_path / "single" / "hf"), checkpoint_tensors(tmp_path / "ranks" / "hf")
    assert sorted(one) == sorted(two)
    assert {k: (t.dtype, t.shape) for k, t in one.items()} == {k: (t.dtype, t.shape) for k, t in two.items()}
    scales = [k for k in one if k.endswith("_scale")]
    assert len(scales) >= 2 * 7 * 2  # input and weight scale of 7 linears in each of 2 layers
    assert max(_relative_difference(one[k], two[k]) for k in scales) <= SCALE_RTOL
    weights = [k for k in one if k.endswith(".weight")]
    assert all(as_bytes(one[k]).equal(as_bytes(two[k])) for k in weights)  # quantized weights bit for bit
    quantized = torch.float8_e4m3fn if fmt == "fp8" else torch.int8
    assert any(t.dtype == quantized for t in two.values())  # FP8 weights came through the byte-wise gather

    manifest = json.loads((tmp_path / "ranks" / "manifest.json").read_text())
    assert manifest["metrics"]["calibration"]["batches_per_rank"] == 2  # 16 samples / batch 4 / 2 ranks
    assert result.quality.baseline == pytest.approx(single.quality.baseline, rel=1e-5)
    assert result.quality.quantized == pytest.approx(single.quality.quantized, rel=1e-5)
    # Rank 1 published nothing and kept its result beside rank 0's work, not over rank 0's.
    rank1 = RunnerResult.model_validate_json(
        (tmp_path / "ranks" / ".qjob-work" / "result-quantize-rank1.json").read_text()
    )
    assert rank1.outcome == "Succeeded" and rank1.artifacts == []
    assert "serving" not in rank1.step_seconds and "report" not in rank1.step_seconds


def test_a_killed_rank_fails_the_other_at_once(tiny_llama, calib_jsonl, tmp_path):
    """A rank that dies (evicted, OOM-killed) makes the survivor fail, not wait: it exits 75
    saying another rank failed, and the operator retries the stage as a whole."""
    config = _config(tiny_llama, calib_jsonl, tmp_path / "out")
    port = free_port()
    # rank 1 is killed right after the rendezvous, while rank 0 goes on to load (collectives)
    survivor = _rank(config, 0, port)
    victim = _rank(config, 1, port)
    deadline = time.monotonic() + 120
    seen = ""
    while "step rendezvous done" not in seen and time.monotonic() < deadline:
        line = victim.stderr.readline()
        assert line or victim.poll() is None, seen[-2000:]
        seen += line
    victim.send_signal(signal.SIGKILL)
    victim.wait(30)
    _, err = survivor.communicate(timeout=120)
    assert survivor.returncode == ExitCode.TRANSIENT, err[-3000:]
    result = RunnerResult.model_validate_json((tmp_path / "out" / "result.json").read_text())
    assert result.outcome == "Failed" and result.reason == "RunnerFailed"
    assert "another rank of this stage failed" in result.message
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"export": {"formats": ["hf", "tensorrt_llm"]}}, "exports the hf checkpoint only"),
        ({"quantization": {"format": "int4_awq"}}, "awq_lite calibration (int4_awq) is not calibrated across ranks"),
        ({"calibration": {"layerwise": True}}, "layer-wise calibration runs in one process"),
    ],
)
def test_the_launcher_ends_the_pod_with_the_failing_ranks_code(overrides, says, tiny_llama, calib_jsonl, tmp_path):
    """Every rank refuses what it cannot do across ranks (InvalidConfig, exit 2): the pod exits 2,
    not torchrun's 1, so the operator's podFailurePolicy fails the job at once."""
    config = _config(tiny_llama, calib_jsonl, tmp_path / "out", **overrides)
    termination = tmp_path / "termination-log"
    done = _launch(config, termination)
    assert done.returncode == ExitCode.INVALID_CONFIG, done.stderr[-3000:]
    result = RunnerResult.model_validate_json(termination.read_text())
    assert result.reason == "InvalidConfig" and result.failed_step == "resolve"
    assert says in result.message and "Fix:" in result.message


def test_a_rank_that_cannot_meet_rank_0_fails_with_rendezvous_failed(tiny_llama, calib_jsonl, tmp_path):
    config = _config(tiny_llama, calib_jsonl, tmp_path / "out")
    port = free_port()  # nobody listens there
    lonely = _rank(config, 1, port, QJOB_RENDEZVOUS_TIMEOUT_SECONDS="3")
    _, err = lonely.communicate(timeout=120)
    assert lonely.returncode == ExitCode.RENDEZVOUS_FAILED, err[-3000:]
    result = RunnerResult.model_validate_json(
        (tmp_path / "out" / ".qjob-work" / "result-quantize-rank1.json").read_text()
    )
    assert result.reason == "RendezvousFailed" and result.failed_step == "rendezvous"
    assert f"127.0.0.1:{port}" in result.message and "timeout 3 s" in result.message


def test_a_pod_whose_torchrun_cannot_meet_rank_0_fails_with_rendezvous_failed(tiny_llama, calib_jsonl, tmp_path):
    """The second pod of a 2-pod stage whose rank 0 never comes: torchrun's own rendezvous fails."""
    config = _config(tiny_llama, calib_jsonl, tmp_path / "out")
    termination = tmp_path / "termination-log"
    done = _launch(config, termination, NNODES="2", NODE_RANK="1", QJOB_RENDEZVOUS_TIMEOUT_SECONDS="3")
    assert done.returncode == ExitCode.RENDEZVOUS_FAILED, done.stderr[-3000:]
    result = RunnerResult.model_validate_json(termination.read_text())
    assert result.reason == "RendezvousFailed" and "node rank 1 of 2" in result.message


def _children_with_rank(parent: int, rank: int) -> list[int]:
    """Processes below ``parent`` whose environment says RANK=<rank> (torchrun's workers)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            found.append(int(proc.name))
    return found


def test_a_worker_killed_under_the_launcher_ends_the_pod_with_its_signal(tiny_llama, calib_jsonl, tmp_path):
    """torchrun stops the other worker when one dies; the pod says which rank died and how
    (128 + SIGKILL), instead of torchrun's exit 1."""
    config = _config(tiny_llama, calib_jsonl, tmp_path / "out")
    termination = tmp_path / "termination-log"
    env = _env(NNODES="1", NPROC_PER_NODE=str(WORLD), NODE_RANK="0", MASTER_PORT=str(free_port()))
    env["QJOB_TERMINATION_LOG"] = str(termination)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "qjob_runner.launch", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (victims := _children_with_rank(launcher.pid, 1)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert victims, "torchrun started no rank 1"
    time.sleep(2)  # well inside the run (imports alone take longer)
    os.kill(victims[0], signal.SIGKILL)
    assert launcher.wait(120) == 128 + signal.SIGKILL
    result = RunnerResult.model_validate_json(termination.read_text())
    assert result.outcome == "Failed" and "rank 1 of this stage ended with signal SIGKILL" in result.message
    assert not (tmp_path / "out" / "manifest.json").exists()
