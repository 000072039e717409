"""The plans automatic sizing makes for 70B, 405B and 671B models on 8-GPU H100, H200 and B200
nodes, with an expected calibration time; printed and saved to benchmarks/results/sizing_plans.json.

    PYTHONPATH=api:operator:hack python benchmarks/sizing_plans.py

Time model (docs/scaling.md): compute at the FP8 calibration throughput measured on one H100
(TinyLlama-1.1B shape, 128 x 512 tokens in 5.39 s: benchmarks/results/runner_gpu_h100.json), AWQ
10.7x slower (its calibration took 70.3 bf16 forwards against 6.57 for FP8); one pod runs its
GPUs one after another (device_map), several pods run data-parallel (FSDP2) and all-gather the
weights once per batch over the inter-node network.
"""

from __future__ import annotations

import json
from pathlib import Path

from qjob_dev.model_sizes import DEEPSEEK_V3, LLAMA_70B, LLAMA_405B
from qjob_operator.sizing import Candidate, Inputs, Limits, node_shapes, plan_quantize

MEASURED_TOKENS_PER_S = 128 * 512 / 5.39  # TinyLlama-1.1B shape, FP8 calibration, one H100
MEASURED_PARAMS = 1_100_048_384
H100_FLOPS = 2 * MEASURED_PARAMS * MEASURED_TOKENS_PER_S  # effective calibration FLOP/s of one H100
SPEEDUP = {"H100": 1.0, "H200": 1.0, "B200": 2.25}  # B200 vs H100 dense BF16 peak (NVIDIA datasheets)
AWQ_SLOWDOWN = 70.31 / 6.57
INTER_NODE_BYTES_PER_S = 50e9  # 400 Gb/s per node, one NIC's worth (an assumption, stated in the docs)
NODES = {"H100": 81559, "H200": 143771, "B200": 183359}
SAMPLES, SEQ = 512, 2048


# (size, parameters active per token): DeepSeek-V3 is a mixture of experts, 37B active per token.
MODELS = {
    "Llama-3.1-70B": (LLAMA_70B, 70.6e9),
    "Llama-3.1-405B": (LLAMA_405B, 405.9e9),
    "DeepSeek-V3 671B": (DEEPSEEK_V3, 37e9),
}
FORMATS = {"fp8": "max", "nvfp4": "max", "nvfp4_awq": "awq_lite"}


def seconds(plan: Candidate, active_params: float, gpu: str, algorithm: str, weight_bytes: int) -> dict:
    tokens = SAMPLES * SEQ
    ranks = plan.pods * plan.gpus_per_pod if plan.pods > 1 else 1  # one pod: GPUs take turns
    compute = tokens * 2 * active_params / (H100_FLOPS * SPEEDUP[gpu] * ranks)
    if algorithm.startswith("awq"):
        compute *= AWQ_SLOWDOWN
    batches_per_rank = -(-SAMPLES // (ranks * plan.batch_size))
    gather = (
        batches_per_rank * weight_bytes * (plan.pods - 1) / plan.pods / INTER_NODE_BYTES_PER_S if plan.pods > 1 else 0
    )
    passes = 2 if plan.layerwise else 1  # layer-wise: a capture pass and a calibration pass per layer
    return {"compute_s": round(compute * passes), "all_gather_s": round(gather * passes)}


def main() -> None:
    limits = Limits(max_gpus_per_pod=8, max_gpus_per_job=64, max_pods_per_stage=8)
    rows = []
    for gpu, memory in NODES.items():
        shapes = node_shapes([(memory, 8)] * 8)
        for name, (size, active) in MODELS.items():
            for fmt, algorithm in FORMATS.items():
                found = plan_quantize(size, Inputs(algorithm, SAMPLES, SEQ, 0, False, 0), shapes, limits)
                row = {"gpu": gpu, "model": name, "format": fmt}
                if isinstance(found, Candidate):
                    row.update(
                        pods=found.pods,
                        gpus_per_pod=found.gpus_per_pod,
                        batch=found.batch_size,
                        layerwise=found.layerwise,
                        **found.estimate.to_api(),
                        **seconds(found, active, gpu, algorithm, size.weight_bytes),
                    )
                else:
                    row.update(refused=found.reason, message=found.message)
                rows.append(row)
                print(json.dumps(row))
    settings = {
        "samples": SAMPLES,
        "sequence_length": SEQ,
        "nodes": "8 nodes of 8 GPUs each kind",
        "policy": limits.__dict__,
        "h100_effective_calibration_flops": H100_FLOPS,
        "inter_node_bytes_per_s": INTER_NODE_BYTES_PER_S,
    }
    out = Path(__file__).parent / "results" / "sizing_plans.json"
    out.write_text(json.dumps({"settings": settings, "plans": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
