"""The memory model and planner behind automatic sizing (spec.resources.gpus: 0), and the
re-plan after an out-of-memory failure. Measured peaks come from benchmarks/results/
runner_gpu_h100.json and docs/scaling.md (H100 and 2xH200 runs)."""

from __future__ import annotations

import pytest
from qjob_dev.model_sizes import LLAMA_8B, LLAMA_405B, TINYLLAMA
from qjob_operator import sizing
from qjob_operator.sizing import Candidate, Inputs, Limits, Refusal, estimate, node_shapes, plan_quantize

GIB = 2**30


# The local control plane's topology (hack/localcluster/topology.yaml): L40S, H100, B200 nodes.
TOPOLOGY = node_shapes([(46068, 8)] * 2 + [(81559, 8)] * 2 + [(183359, 8)])
POLICY = Limits(max_gpus_per_pod=8, max_gpus_per_job=16, max_pods_per_stage=2)


def peak_gib(size, algorithm, batch, gpus=1, seq=512, samples=128) -> float:
    est = estimate(
        size,
        Inputs(algorithm, samples, seq, batch, False, 0),
        gpus_per_pod=gpus,
        pods=1,
        batch_size=batch,
        layerwise=False,
        shape_memory_mib=81559,
    )
    return est.peak_mib * 2**20 / GIB


@pytest.mark.parametrize(
    ("size", "algorithm", "batch", "gpus", "measured"),
    [
        (TINYLLAMA, "max", 4, 1, 2.26),  # FP8 on H100 (runner_gpu_h100.json)
        (TINYLLAMA, "awq_lite", 4, 1, 2.61),  # INT4 AWQ on H100
        (LLAMA_8B, "max", 16, 1, 18.0),  # FP8 on H100, batch 16 x 512 tokens
        (LLAMA_8B, "max", 16, 2, 10.9),  # FP8 split over 2 H200s: busiest GPU
        (LLAMA_8B, "smoothquant", 16, 2, 15.5),  # INT8 SmoothQuant over 2 H200s: busiest GPU
    ],
)
def test_estimate_matches_measured_peaks_within_six_percent(size, algorithm, batch, gpus, measured):
    assert peak_gib(size, algorithm, batch, gpus) == pytest.approx(measured, rel=0.06)


def test_eight_b_fits_one_gpu_of_the_smallest_node_that_holds_it():
    plan = plan_quantize(LLAMA_8B, Inputs("max", 512, 512, 0, False, 0), TOPOLOGY, POLICY)
    assert isinstance(plan, Candidate)
    assert (plan.pods, plan.gpus_per_pod, plan.batch_size, plan.layerwise) == (1, 1, 16, False)
    assert plan.shape.memory_mib == 46068  # the L40S, leaving H100s and B200s free
    assert plan.estimate.peak_mib <= plan.estimate.usable_mib == int(46068 * 0.9) - 1024


def test_405b_spans_two_h100_nodes_when_there_is_no_b200():
    h100_only = node_shapes([(81559, 8)] * 2)
    plan = plan_quantize(LLAMA_405B, Inputs("max", 512, 512, 0, False, 0), h100_only, POLICY)
    assert isinstance(plan, Candidate)
    assert (plan.pods, plan.gpus_per_pod) == (2, 8)
    # Sharded over 16 GPUs, plus the gathered and prefetched layer.
    assert plan.estimate.weights_mib == pytest.approx(
        (LLAMA_405B.weight_bytes / 16 + 2 * LLAMA_405B.weight_bytes / 126) / 2**20, abs=1
    )


def test_awq_is_never_spread_over_pods():
    """The runner calibrates AWQ in one process only (its scales come from each rank's own data),
    so a model that needs two nodes for AWQ is refused, naming the formats that can spread."""
    h100_only = node_shapes([(81559, 8)] * 2)
    plan = plan_quantize(LLAMA_405B, Inputs("awq_lite", 512, 512, 0, False, 0), h100_only, POLICY)
    assert isinstance(plan, Refusal) and plan.reason == "NoMatchingNodes"
    assert "awq_lite calibration runs in one pod" in plan.message and "fp8 or nvfp4" in plan.message


def test_plan_beyond_policy_is_refused_with_the_numbers():
    h100_only = node_shapes([(81559, 8)] * 2)
    refusal = plan_quantize(LLAMA_405B, Inputs("max", 512, 512, 0, False, 0), h100_only, Limits(8, 8, 1))
    assert isinstance(refusal, Refusal) and refusal.reason == "PolicyViolation"
    assert "811.8 GB of BF16 weights" in refusal.message
    assert "2 pod(s) x 8 GPU(s) of 81559 MiB" in refusal.message
    assert "at most 8 GPUs per job" in refusal.message and "1 pod per stage" in refusal.message


def test_model_no_node_set_can_hold_is_refused_as_no_matching_nodes():
    l40s_only = node_shapes([(46068, 8)] * 2)
    refusal = plan_quantize(LLAMA_405B, Inputs("max", 512, 512, 0, False, 0), l40s_only, Limits(64, 64, 64))
    assert isinstance(refusal, Refusal) and refusal.reason == "NoMatchingNodes"
    assert "2 node(s) with 8 x 46068 MiB GPUs" in refusal.message and "estimated peak" in refusal.message


def test_unknown_architecture_numbers_are_not_guessed():
    size = LLAMA_8B.model_copy(update={"hidden_size": None, "vocab_size": None})
    with pytest.raises(sizing.SizeUnknownError, match="hidden_size, vocab_size"):
        plan_quantize(size, Inputs("max", 512, 512, 0, False, 0), TOPOLOGY, POLICY)


def test_fixed_batch_and_gpus_are_kept():
    plan = plan_quantize(LLAMA_8B, Inputs("max", 512, 512, 4, False, 2), TOPOLOGY, POLICY)
    assert (plan.gpus_per_pod, plan.pods, plan.batch_size) == (2, 1, 4)


def test_after_an_oom_the_plan_grows_and_never_repeats():
    inputs = Inputs("max", 512, 512, 16, False, 0)  # batch fixed: only GPUs can grow
    tried: set = set()
    first = plan_quantize(LLAMA_8B, inputs, TOPOLOGY, POLICY)
    seen = [first]
    correction = 1.0
    for _ in range(4):
        tried.add(seen[-1].signature())
        correction = sizing.correction_after_oom(seen[-1].estimate)
        nxt = plan_quantize(LLAMA_8B, inputs, TOPOLOGY, POLICY, correction=correction, tried=frozenset(tried))
        if isinstance(nxt, Refusal):
            break
        assert nxt.signature() not in tried
        # Bigger: more GPUs, or bigger GPUs, so the failed plan's peak gets more room per GPU.
        assert (nxt.total_gpus, nxt.shape.memory_mib) > (seen[-1].total_gpus, seen[-1].shape.memory_mib)
        seen.append(nxt)
    assert len(seen) >= 3
    assert correction > 1.0


def test_layerwise_has_no_logits_but_keeps_every_batch_of_one_layer():
    inputs = Inputs("max", 512, 512, 16, False, 0)
    kwargs = dict(gpus_per_pod=1, pods=1, batch_size=16, shape_memory_mib=81559)
    full = estimate(LLAMA_8B, inputs, layerwise=False, **kwargs)
    layerwise = estimate(LLAMA_8B, inputs, layerwise=True, **kwargs)
    cached = 2 * 512 * 512 * 4096 * 2 / 2**20  # inputs + outputs of one layer for 512 samples, bf16
    assert layerwise.weights_mib == full.weights_mib
    assert layerwise.activations_mib == pytest.approx(cached + 16 * 512 * (3 * 14336 + 4 * 4096) * 2 / 2**20, abs=1)
