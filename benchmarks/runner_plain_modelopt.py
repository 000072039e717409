"""The baseline for the runner's overhead: ModelOpt called directly, the way its examples do.

Same model, same calibration texts, tokenizer settings, batch size, preset and export as the
runner; no pipeline, no reporting, no checks. Run on the GPU by ``benchmarks/runner_gpu.py``.

    python benchmarks/runner_plain_modelopt.py MODEL_DIR CALIB_JSONL FORMAT OUT_DIR [SAMPLES SEQ BATCH]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

PRESETS = {
    "fp8": "FP8_DEFAULT_CFG",
    "int4_awq": "INT4_AWQ_CFG",
    "nvfp4": "NVFP4_DEFAULT_CFG",
    "int8_smoothquant": "INT8_SMOOTHQUANT_CFG",
    "w4a8_awq": "W4A8_AWQ_BETA_CFG",
}


def main(
    model_dir: str, calib: str, fmt: str, out_dir: str, samples: int = 128, seq: int = 512, batch: int = 4
) -> dict:
    t_start = time.perf_counter()
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    times = {"import": time.perf_counter() - t_start}
    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the benchmark's dry run
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=dev).eval()
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    sync()
    times["load"] = time.perf_counter() - t
    t = time.perf_counter()
    texts = [json.loads(line)["text"] for line in Path(calib).read_text().splitlines() if line.strip()][:samples]
    batches = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i : i + batch], return_tensors="pt", padding=True, truncation=True, max_length=seq)
        batches.append({k: v.to(dev) for k, v in enc.items() if k in {"input_ids", "attention_mask"}})
    times["data"] = time.perf_counter() - t

    def forward_loop(m):
        with torch.no_grad():
            for b in batches:
                m(**b)

    t = time.perf_counter()
    model = mtq.quantize(model, getattr(mtq, PRESETS[fmt]), forward_loop)
    sync()
    times["quantize"] = time.perf_counter() - t
    t = time.perf_counter()
    with torch.inference_mode():
        export_hf_checkpoint(model, export_dir=out_dir)
    tok.save_pretrained(out_dir)
    times["export"] = time.perf_counter() - t
    times["total_after_import"] = sum(v for k, v in times.items() if k != "import")
    size = sum(p.stat().st_size for p in Path(out_dir).rglob("*") if p.is_file())
    return {"times": times, "checkpoint_bytes": size, "shards": len(list(Path(out_dir).glob("*.safetensors")))}


if __name__ == "__main__":
    a = sys.argv[1:]
    res = main(a[0], a[1], a[2], a[3], *(int(x) for x in a[4:7]))
    print("QJOB_BENCH " + json.dumps(res))
