"""The runner's fast paths compute the same things as the slow ones they replaced.

Hashing while the export writes (standard sha256 per file, as a re-read gives), calibration with
last-position logits only (the same quantizer statistics as with full logits), and the
calibration-state snapshot (independent of later in-place writes; rescaled weights written only
for a failed run).
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import torch
from qjob_api.runner import RunnerConfig
from qjob_runner import run
from qjob_runner.artifacts import FileHashes, describe
from qjob_runner.steps import export
from qjob_runner.steps.data import forward_kwargs
from qjob_runner.steps.quantize import _snapshot, _to_host

from .helpers import runner_config


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_file_hashes_are_plain_sha256_and_never_stale(tmp_path):
    files = []
    for i in range(5):
        p = tmp_path / f"shard-{i}.bin"
        p.write_bytes(os.urandom(300_000 + i))
        files.append(p)
    hashes = FileHashes(workers=3)
    for p in files[:3]:
        hashes.submit(p)  # hashed in the background, like shards during the export
    # A file rewritten after its hash started must be hashed again, not reported stale.
    time.sleep(0.01)
    files[1].write_bytes(b"rewritten")
    digests = hashes.map(files)
    hashes.close()
    assert digests == [_sha(p) for p in files]
    size, folder, entries = describe(tmp_path)
    assert size == sum(p.stat().st_size for p in files)
    assert [e["sha256"] for e in entries] == [_sha(p) for p in files]
    lines = "".join(f"{e['path']} {e['sha256']}\n" for e in entries)
    assert folder == hashlib.sha256(lines.encode()).hexdigest()


def test_export_hashes_each_shard_as_it_is_written(tiny_llama, calib_jsonl, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "HF_SHARD_SIZE", "400KB")  # several shards from the tiny model
    submitted = []
    original = FileHashes.submit

    def record(self, path):
        submitted.append((path.name, (tmp_path / "out" / "manifest.json").exists()))
        return original(self, path)

    monkeypatch.setattr(FileHashes, "submit", record)
    out = tmp_path / "out"
    cfg = RunnerConfig.model_validate(
        runner_config(
            model={"path": str(tiny_llama)},
            quantization={"format": "fp8"},
            calibration={"dataset": {"path": str(calib_jsonl)}},
            evaluation={"enabled": False},
            outputDir=str(out),
        )
    )
    r = run(cfg)
    assert r.outcome == "Succeeded", r.message
    shards = sorted((out / "hf").glob("*.safetensors"))
    assert len(shards) >= 3
    # every shard was handed to the hasher by the export itself, before any manifest existed
    assert sorted(name for name, _ in submitted) == [p.name for p in shards]
    assert not any(manifest_existed for _, manifest_existed in submitted)
    manifest = json.loads((out / "manifest.json").read_text())
    files = {f["path"]: f["sha256"] for f in manifest["artifacts"][0]["files"]}
    published = sorted(p for p in (out / "hf").rglob("*") if p.is_file())
    assert files == {p.relative_to(out / "hf").as_posix(): _sha(p) for p in published}


def test_last_position_logits_calibrate_the_same_quantizers(tiny_llama, calib_jsonl):
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.padding_side = "left"
    texts = [json.loads(x)["text"] for x in calib_jsonl.read_text().splitlines()[:16]]
    batches = [tok(texts[i : i + 4], return_tensors="pt", padding=True) for i in range(0, 16, 4)]

    def amaxes(extra):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
        assert forward_kwargs(model) == {"logits_to_keep": 1}

        def loop(m):
            with torch.no_grad():
                for b in batches:
                    m(**b, **extra)

        mtq.quantize(model, mtq.FP8_DEFAULT_CFG, loop)
        assert forward_kwargs(model) == {"logits_to_keep": 1}  # the preset leaves lm_head unquantized
        return {n: m.amax.clone() for n, m in model.named_modules() if n.endswith("_quantizer") and m.amax is not None}

    full, last = amaxes({}), amaxes({"logits_to_keep": 1})
    assert len(full) > 10 and full.keys() == last.keys()
    assert all(torch.equal(full[k], last[k]) for k in full)


def test_quantized_output_layer_keeps_full_logits(tiny_llama, calib_jsonl):
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    cfg = {**mtq.FP8_DEFAULT_CFG, "quant_cfg": [*mtq.FP8_DEFAULT_CFG["quant_cfg"]]}
    cfg["quant_cfg"].append({"quantizer_name": "*lm_head*weight_quantizer", "cfg": {"num_bits": (4, 3), "axis": None}})
    batch = tok(["some calibration text"], return_tensors="pt")
    mtq.quantize(model, cfg, lambda m: m(**batch))
    assert model.lm_head.weight_quantizer.is_enabled
    assert forward_kwargs(model) == {}


def test_state_snapshot_is_independent_of_later_writes():
    weight = torch.randn(64, 32)
    amax = torch.tensor(3.0)
    copies, events = _snapshot({"w": weight, "q._amax": amax})
    expect = weight.clone()
    weight.mul_(2.0)  # the export packs weights in place after the snapshot
    amax.fill_(0.0)
    host = _to_host(copies, events)
    assert torch.equal(host["w"], expect) and host["q._amax"].item() == 3.0 and host["w"].device.type == "cpu"


def test_rescaled_weights_are_saved_only_for_a_failed_run(tiny_llama, calib_jsonl, tmp_path):
    """AWQ's resume state (most of the model) is written when a later step fails (see
    test_resume_skips_calibration), never by a run that succeeds; scale-only states always are."""

    def state_files(fmt):
        out = tmp_path / fmt
        cfg = RunnerConfig.model_validate(
            runner_config(
                model={"path": str(tiny_llama)},
                quantization={"format": fmt},
                calibration={"dataset": {"path": str(calib_jsonl)}},
                evaluation={"enabled": False},
                outputDir=str(out),
            )
        )
        r = run(cfg)
        assert r.outcome == "Succeeded", r.message
        return list((out / ".qjob-work").glob("calibrated-*.safetensors"))

    assert state_files("int4_awq") == []
    assert len(state_files("fp8")) == 1
