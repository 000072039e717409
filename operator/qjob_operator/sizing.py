"""Automatic sizing of the quantize stage: from the model's size to GPUs per pod and pods.

Pure functions. ``estimate`` is the memory model of one calibration forward pass (docs/scaling.md
derives it and checks it against peaks measured on H100 and H200); ``plan_quantize`` picks the
smallest plan whose estimate fits the nodes that can run the stage, within the operator policy;
after an out-of-memory failure the same search runs again with the failed plan excluded and the
estimate scaled up by what the failure taught (``correction_after_oom``), so a retry is never the
same plan.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from qjob_api.capabilities import MULTI_RANK_ALGORITHMS, QuantFormat
from qjob_api.reasons import Reason
from qjob_api.v1alpha1 import MemoryEstimate, ModelSize

MIB = 2**20
#: Fraction of a GPU's memory a plan may fill (allocator fragmentation, export temporaries).
USABLE_FRACTION = 0.90
#: Per GPU: CUDA context, cuBLAS and NCCL workspaces.
RESERVED_MIB = 1024
#: Batch sizes tried when spec.calibration.batchSize is 0, largest first.
AUTO_BATCHES = (16, 8, 4, 2, 1)
#: GPUs per pod tried inside one node (a multi-pod plan always takes whole nodes).
GPU_COUNTS = (1, 2, 4, 8)
#: Extra state of the calibration algorithm, as a fraction of the GPU's weight share. Measured:
#: SmoothQuant 0.62 (Llama-3.1-8B shape split over 2 H200s: 15.5 GB peak vs 10.9 for FP8), AWQ
#: lite 0.17 (TinyLlama-1.1B shape on H100: 2.61 GiB vs 2.26 for FP8). AWQ clip/full search more
#: candidates than lite; without a measurement they take the larger measured factor.
ALGORITHM_FACTOR = {"max": 0.0, "smoothquant": 0.62, "awq_lite": 0.17, "awq_clip": 0.62, "awq_full": 0.62}
#: The algorithm of each format's ModelOpt preset (spec.quantization.algorithm overrides it).
FORMAT_ALGORITHM = {
    QuantFormat.INT8_SMOOTHQUANT: "smoothquant",
    QuantFormat.INT4_AWQ: "awq_lite",
    QuantFormat.W4A8_AWQ: "awq_lite",
    QuantFormat.NVFP4_AWQ: "awq_lite",
}
#: A retry after an OOM assumes at least this much more memory than the failed plan could hold.
OOM_MARGIN = 1.10


@dataclass(frozen=True)
class NodeShape:
    """Nodes that can run the stage, grouped by GPU memory and GPU count."""

    memory_mib: int
    gpus: int
    count: int

    def describe(self) -> str:
        return f"{self.count} node(s) with {self.gpus} x {self.memory_mib} MiB GPUs"


@dataclass(frozen=True)
class Limits:
    max_gpus_per_pod: int
    max_gpus_per_job: int
    max_pods_per_stage: int


@dataclass(frozen=True)
class Inputs:
    """What the plan depends on besides the model's size and the nodes."""

    algorithm: str
    samples: int
    sequence_length: int
    batch_size: int  # 0: choose
    layerwise: bool  # true: required by the spec
    gpus: int  # 0: choose; else fixed by the spec (one pod)


@dataclass(frozen=True)
class Candidate:
    gpus_per_pod: int
    pods: int
    batch_size: int
    layerwise: bool
    shape: NodeShape
    estimate: MemoryEstimate

    @property
    def total_gpus(self) -> int:
        return self.gpus_per_pod * self.pods

    def signature(self) -> tuple[int, int, int, bool]:
        return (self.gpus_per_pod, self.pods, self.batch_size, self.layerwise)

    def describe(self) -> str:
        where = f"{self.pods} pod(s) x {self.gpus_per_pod} GPU(s) of {self.shape.memory_mib} MiB"
        mode = ", layer-wise" if self.layerwise else ""
        return (
            f"{where}, batch {self.batch_size}{mode}: estimated peak {self.estimate.peak_mib} MiB per GPU "
            f"(weights {self.estimate.weights_mib}, activations {self.estimate.activations_mib}, "
            f"algorithm {self.estimate.algorithm_mib}) of {self.estimate.usable_mib} MiB usable"
        )


@dataclass(frozen=True)
class Refusal:
    reason: Reason  # NO_MATCHING_NODES (no node set can ever hold it) or POLICY_VIOLATION (policy forbids it)
    message: str


class SizeUnknownError(ValueError):
    """The model's config lacks what the memory model needs: no plan without it."""


def algorithm_of(fmt: QuantFormat | None, override: str | None) -> str:
    return override or FORMAT_ALGORITHM.get(fmt, "max")


def _mib(n: float) -> int:
    return int(-(-n // MIB))  # round up


def usable_mib(memory_mib: int) -> int:
    return int(memory_mib * USABLE_FRACTION) - RESERVED_MIB


def _require(size: ModelSize) -> tuple[int, int, int, int, int]:
    missing = [
        name
        for name, value in (
            ("num_hidden_layers", size.layers),
            ("hidden_size", size.hidden_size),
            ("intermediate_size", size.intermediate_size),
            ("vocab_size", size.vocab_size),
        )
        if not value
    ]
    if missing:
        raise SizeUnknownError(
            f"the model's config.json lacks {', '.join(missing)}, which the memory model needs: "
            "set spec.resources.gpus to a number instead of 0 (auto)"
        )
    kv_width = (size.kv_heads or 0) * (size.head_dim or 0) or size.hidden_size
    return size.layers, size.hidden_size, size.intermediate_size, size.vocab_size, kv_width  # type: ignore[return-value]


def estimate(
    size: ModelSize,
    inputs: Inputs,
    *,
    gpus_per_pod: int,
    pods: int,
    batch_size: int,
    layerwise: bool,
    shape_memory_mib: int,
    correction: float = 1.0,
) -> MemoryEstimate:
    """Peak memory of the busiest GPU during calibration.

    One pod: accelerate's device_map splits the layers over the pod's GPUs and a batch flows
    through them in turn (the last GPU also holds lm_head and the logits). Several pods: FSDP2
    shards the weights over every rank, all-gathers one layer at a time (and prefetches the next),
    and every rank runs its own batches, so activations are not divided.
    """
    layers, hidden, inter, vocab, kv_width = _require(size)
    act = 4 if size.dtype.upper() in ("F32", "FLOAT32") else 2
    total = gpus_per_pod * pods
    w = size.weight_bytes
    gathered = 2 if pods > 1 else (1 if total > 1 else 0)  # FSDP2 unit + prefetch / uneven layer split
    weights = w / total + gathered * w / layers
    tokens = batch_size * inputs.sequence_length
    layer_temp = tokens * (3 * inter + 4 * hidden) * act
    hidden_states = 2 * tokens * hidden * act
    if layerwise:
        # ModelOpt's layer-wise calibration keeps every calibration batch's input and output of the
        # current layer; no full forward, so no logits and no cross-layer KV cache.
        samples_per_rank = -(-inputs.samples // pods)
        activations = 2 * samples_per_rank * inputs.sequence_length * hidden * act + layer_temp
    else:
        kv = 2 * layers * tokens * kv_width * act  # HF forward keeps the KV cache (use_cache)
        kv_here = kv if pods > 1 else kv / gpus_per_pod
        logits = tokens * vocab * act
        activations = kv_here + max(logits, layer_temp) + hidden_states
    algorithm = ALGORITHM_FACTOR.get(inputs.algorithm, max(ALGORITHM_FACTOR.values())) * w / total
    return MemoryEstimate(
        weights_mib=_mib(weights),
        activations_mib=_mib(activations),
        algorithm_mib=_mib(algorithm),
        correction=round(correction, 3),
        peak_mib=_mib((weights + activations + algorithm) * correction),
        usable_mib=usable_mib(shape_memory_mib),
    )


def node_shapes(nodes: Iterable[tuple[int, int]]) -> list[NodeShape]:
    """(GPU memory MiB, allocatable GPUs) per node -> shapes, smallest GPUs first."""
    counts = Counter((m, g) for m, g in nodes if m > 0 and g > 0)
    return sorted((NodeShape(m, g, n) for (m, g), n in counts.items()), key=lambda s: (s.memory_mib, s.gpus))


def _candidates(
    size: ModelSize, inputs: Inputs, shapes: list[NodeShape], limits: Limits | None, correction: float
) -> list[Candidate]:
    batches = [inputs.batch_size] if inputs.batch_size else [b for b in AUTO_BATCHES if b <= inputs.samples] or [1]
    modes = [True] if inputs.layerwise else [False, True]
    found = []
    for shape in shapes:
        max_pods = shape.count if limits is None else min(shape.count, limits.max_pods_per_stage)
        if inputs.algorithm not in MULTI_RANK_ALGORITHMS or inputs.layerwise:
            max_pods = 1  # the runner calibrates it in one process only
        for pods in range(1, (max_pods if not inputs.gpus else 1) + 1):
            if inputs.gpus:
                counts = [inputs.gpus] if inputs.gpus <= shape.gpus else []
            elif pods == 1:
                counts = sorted({g for g in (*GPU_COUNTS, shape.gpus) if g <= shape.gpus})
            else:
                counts = [shape.gpus]
            for gpus in counts:
                if limits and (gpus > limits.max_gpus_per_pod or gpus * pods > limits.max_gpus_per_job):
                    continue
                for batch in batches:
                    # ModelOpt 0.47 keeps no layer-wise checkpoints across ranks: one pod only
                    for layerwise in modes if pods == 1 else [False]:
                        est = estimate(
                            size,
                            inputs,
                            gpus_per_pod=gpus,
                            pods=pods,
                            batch_size=batch,
                            layerwise=layerwise,
                            shape_memory_mib=shape.memory_mib,
                            correction=correction,
                        )
                        found.append(Candidate(gpus, pods, batch, layerwise, shape, est))
    return found


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _cost(c: Candidate) -> tuple:
    # Fewest GPUs, then fewest pods, then the largest batch (fastest), full forward before
    # layer-wise, then the smallest GPUs (leave the big ones to jobs that need them).
    return (c.total_gpus, c.pods, -c.batch_size, c.layerwise, c.shape.memory_mib)


def plan_quantize(
    size: ModelSize,
    inputs: Inputs,
    shapes: list[NodeShape],
    limits: Limits,
    *,
    correction: float = 1.0,
    tried: frozenset[tuple[int, int, int, bool]] = frozenset(),
) -> Candidate | Refusal:
    """The cheapest plan that fits (and was not tried before), or why there is none."""
    if not shapes:
        return Refusal(Reason.NO_MATCHING_NODES, "no GPU node can run the quantize stage")
    fits = [
        c
        for c in _candidates(size, inputs, shapes, limits, correction)
        if c.estimate.peak_mib <= c.estimate.usable_mib and c.signature() not in tried
    ]
    if fits:
        return min(fits, key=_cost)
    unlimited = [
        c
        for c in _candidates(size, inputs, shapes, None, correction)
        if c.estimate.peak_mib <= c.estimate.usable_mib and c.signature() not in tried
    ]
    weights = f"{size.weight_bytes / 1e9:.1f} GB of {size.dtype} weights ({size.parameters / 1e9:.2f}B parameters)"
    if unlimited:
        best = min(unlimited, key=_cost)
        return Refusal(
            Reason.POLICY_VIOLATION,
            f"{weights} need {best.describe()}, but the operator policy allows at most "
            f"{_count(limits.max_gpus_per_job, 'GPU')} per job, {limits.max_gpus_per_pod} per pod and "
            f"{_count(limits.max_pods_per_stage, 'pod')} per stage: ask the platform team to raise "
            "policy.maxGpusPerJob / maxPodsPerStage, or choose a smaller model",
        )
    largest = max(shapes, key=lambda s: s.memory_mib * s.gpus * s.count)
    smallest = min(
        _candidates(size, inputs, [largest], None, correction),
        key=lambda c: c.estimate.peak_mib - c.estimate.usable_mib,
    )
    what = "a plan not tried before" if tried else "it"
    one_pod = (
        f" ({inputs.algorithm} calibration runs in one pod; a format calibrated with "
        f"{' or '.join(sorted(MULTI_RANK_ALGORITHMS))}, e.g. fp8 or nvfp4, can spread over several)"
        if inputs.algorithm not in MULTI_RANK_ALGORITHMS
        else ""
    )
    return Refusal(
        Reason.NO_MATCHING_NODES,
        f"{weights} do not fit the nodes that can run the quantize stage ({'; '.join(s.describe() for s in shapes)}): "
        f"even {smallest.describe()} leaves no room for {what}{one_pod}",
    )


def correction_after_oom(failed: MemoryEstimate) -> float:
    """An OOM shows the real peak exceeded what the plan could use: scale later estimates so
    the failed plan would not fit, with a margin."""
    return failed.correction * max(1.0, failed.usable_mib / max(failed.peak_mib, 1)) * OOM_MARGIN
