"""The CUDA-only formats' checkpoint metadata against the serving table (run on a lent GPU).

tests/runner/test_serving_metadata.py exports every CPU-capable format and compares the written
hf_quant_config.json with ``qjob_api.capabilities.HF_QUANTIZATION``; NVFP4, NVFP4 AWQ and MXFP4
need CUDA to calibrate. This runs the real runner on a tiny random-weight Llama (hidden 256, so
every linear layer is a multiple of the 16/32-element blocks) for each of them, with an FP8 and an
NVFP4 KV cache, and records what ModelOpt wrote, what the table says, and which runtimes the
runner's serving step found loading it, into ``$OUT/serving_metadata_gpu.json`` (the H200 run:
``benchmarks/results/serving_metadata_gpu_h200.json``).

    PYTHONPATH=api:operator:jobrunner:hack:. python benchmarks/serving_metadata_gpu.py
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = Path(os.environ.get("OUT", "/tmp/qjob-serving-metadata"))
WORK = Path(os.environ.get("QJOB_BENCH_DIR", "/tmp/qjob-serving-metadata-work"))


def main() -> int:
    import torch
    from qjob_api.capabilities import CUDA_ONLY_FORMATS, HF_KV_CACHE, HF_QUANTIZATION, KVCacheFormat
    from qjob_api.runner import RunnerConfig
    from qjob_dev.tiny_models import llama_config, pydoc_paragraphs, train_tokenizer, write_jsonl
    from qjob_runner import run
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tests.runner.helpers import runner_config

    assert torch.cuda.is_available(), "needs a CUDA GPU"
    model_dir = WORK / "tiny-llama-256"
    model_dir.mkdir(parents=True, exist_ok=True)
    train_tokenizer(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(vocab_size=len(tok), hidden=256, inter=512)).save_pretrained(model_dir)
    calib = write_jsonl(WORK / "calib.jsonl", pydoc_paragraphs()[:64])
    results = {
        "gpu": torch.cuda.get_device_name(0),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
    }
    runs, mismatches = [], 0
    for fmt in sorted(CUDA_ONLY_FORMATS, key=lambda f: f.value):
        for kv in (KVCacheFormat.FP8, KVCacheFormat.NVFP4):
            out = WORK / f"out-{fmt.value}-{kv.value}"
            cfg = runner_config(
                model={"path": str(model_dir), "dtype": "bfloat16"},
                quantization={"format": fmt.value, "kvCache": kv.value},
                calibration={"dataset": {"path": str(calib)}, "samples": 16, "sequenceLength": 64, "batchSize": 4},
                evaluation={"enabled": False},
                outputDir=str(out),
            )
            result = run(RunnerConfig.model_validate(cfg))
            entry = {"format": fmt.value, "kvCache": kv.value, "outcome": result.outcome, "message": result.message}
            if result.outcome == "Succeeded":
                written = json.loads((out / "hf" / "hf_quant_config.json").read_text())["quantization"]
                table = HF_QUANTIZATION[fmt]
                entry["written"] = {k: written.get(k) for k in ("quant_algo", "kv_cache_quant_algo", "group_size")}
                entry["table"] = {
                    "quant_algo": table.quant_algo,
                    "kv_cache_quant_algo": HF_KV_CACHE[kv],
                    "group_size": table.group_size,
                }
                entry["matches_table"] = entry["written"] == entry["table"]
                [ckpt] = [a for a in result.artifacts if a.kind == "checkpoint"]
                entry["runtimes"] = [t.to_api() for t in ckpt.runtimes]
                mismatches += not entry["matches_table"]
            else:
                mismatches += 1
            runs.append(entry)
            print(json.dumps(entry), flush=True)
    results["runs"] = runs
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "serving_metadata_gpu.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"{len(runs)} runs, {mismatches} not matching the table")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
