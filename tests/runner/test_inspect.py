"""The inspect stage: the model's size from safetensors headers, the way the operator sizes it."""

from __future__ import annotations

import json

from qjob_api.runner import RunnerConfig
from qjob_runner.pipeline import run

from .helpers import runner_config


def _inspect(folder, out):
    cfg = runner_config(stage="inspect", model={"path": str(folder)}, outputDir=str(out))
    cfg["calibration"]["dataset"]["path"] = "/nonexistent"  # inspect reads no data
    return run(RunnerConfig.model_validate(cfg))


def test_inspect_reads_size_from_headers_without_loading(tiny_llama, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    result = _inspect(tiny_llama, tmp_path)
    assert result.outcome == "Succeeded", result.message
    size = result.model_size
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    tensors = list(model.state_dict().values())
    assert size.parameters == sum(t.numel() for t in tensors)
    assert size.weight_bytes == sum(t.numel() * t.element_size() for t in tensors)
    assert size.dtype == "F32"
    assert (size.layers, size.hidden_size, size.intermediate_size) == (2, 128, 256)
    assert (size.kv_heads, size.head_dim, size.vocab_size) == (2, 32, model.config.vocab_size)
    # The operator reads it from the termination message, the pod's last word.
    assert json.loads(result.termination_message())["modelSize"]["weightBytes"] == size.weight_bytes
    assert (tmp_path / "result-inspect.json").exists() and not (tmp_path / "result.json").exists()


def test_inspect_refuses_to_guess_without_safetensors(tiny_llama, tmp_path):
    folder = tmp_path / "bin-model"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_llama / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"\0" * 64)
    result = _inspect(folder, tmp_path / "out")
    assert result.outcome == "Failed" and result.reason == "InvalidInput"
    assert "size is unknown" in result.message and "spec.resources.gpus" in result.message
    assert result.model_size is None


def test_inspect_names_a_corrupt_header(tiny_llama, tmp_path):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_llama / "config.json").read_text())
    (folder / "model.safetensors").write_bytes((16).to_bytes(8, "little") + b"{not json at all")
    result = _inspect(folder, tmp_path / "out")
    assert result.reason == "InvalidInput" and "model.safetensors" in result.message
