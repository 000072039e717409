"""baseline / evaluate: quality before and after quantization, and the quality gate.

Causal LMs: perplexity on held-out text (never used for calibration), as non-overlapping windows
of the calibration sequence length. Encoders: mean-pooled embeddings of the held-out texts,
cosine similarity of quantized vs unquantized. ``baseline`` runs before ``quantize`` (which
changes the model in place); ``evaluate`` runs after it and *before* export (ModelOpt's export
replaces weights with packed integers, after which the in-memory model no longer runs).
"""

from __future__ import annotations

import logging

from qjob_api.capabilities import ModelTask
from qjob_api.v1alpha1 import Quality

from ..context import RunContext
from ..errors import QualityGateFailed
from ..quality import embeddings, perplexity, perplexity_windows

log = logging.getLogger("qjob_runner.evaluate")


def run_baseline(ctx: RunContext) -> None:
    if not ctx.config.evaluation.enabled or not ctx.data.eval_texts:
        return
    ctx.reporter.update(step="evaluate", message="measuring the unquantized model on held-out text")
    if ctx.task == ModelTask.CAUSAL_LM:
        ctx.eval_windows = perplexity_windows(ctx)
        ctx.baseline = perplexity(ctx.model, ctx.eval_windows, ctx.device)
    else:
        ctx.baseline = embeddings(ctx.model, ctx.tokenizer, ctx.data.eval_texts, ctx.data.sequence_length, ctx.device)


def check_gate(ctx: RunContext, quality: Quality) -> None:
    gate = ctx.config.evaluation.gate
    if gate is None:
        return
    failures = []
    if (
        gate.max_perplexity_increase is not None
        and quality.metric == "perplexity"
        and quality.degradation is not None
        and quality.degradation > gate.max_perplexity_increase
    ):
        failures.append(
            f"perplexity rose {quality.degradation:.2%} ({quality.baseline:.3f} -> {quality.quantized:.3f}), "
            f"more than maxPerplexityIncrease {gate.max_perplexity_increase:.2%}"
        )
    if (
        gate.min_cosine_similarity is not None
        and quality.metric == "cosine_similarity"
        and quality.quantized is not None
        and quality.quantized < gate.min_cosine_similarity
    ):
        failures.append(
            f"mean cosine similarity {quality.quantized:.4f} is below minCosineSimilarity {gate.min_cosine_similarity}"
        )
    quality.gate_passed = not failures
    if failures:
        raise QualityGateFailed(
            "quality gate failed: " + "; ".join(failures),
            "try a less aggressive format (e.g. fp8 instead of int4_awq/int8), exclude sensitive layers "
            "(spec.quantization.excludeModules), use more calibration samples, or relax spec.evaluation.gate",
        )


def run(ctx: RunContext) -> None:
    import torch

    if not ctx.config.evaluation.enabled or ctx.baseline is None:
        ctx.reporter.update(step="evaluate", message="evaluation disabled or no held-out text")
        return
    ctx.reporter.update(step="evaluate", message="measuring the quantized model on held-out text")
    if ctx.task == ModelTask.CAUSAL_LM:
        windows = ctx.eval_windows
        q = perplexity(ctx.model, windows, ctx.device)
        quality = Quality(
            metric="perplexity",
            baseline=round(ctx.baseline, 6),
            quantized=round(q, 6),
            degradation=round(q / ctx.baseline - 1.0, 6),
        )
        ctx.metrics["eval_tokens"] = int(sum(w.numel() for w in windows))
    else:
        emb = embeddings(ctx.model, ctx.tokenizer, ctx.data.eval_texts, ctx.data.sequence_length, ctx.device)
        cos = torch.nn.functional.cosine_similarity(emb, ctx.baseline)
        quality = Quality(
            metric="cosine_similarity",
            baseline=1.0,
            quantized=round(cos.mean().item(), 6),
            degradation=round(1.0 - cos.mean().item(), 6),
        )
        ctx.metrics["cosine_min"] = round(cos.min().item(), 6)
        ctx.quantized_embeddings = emb
    ctx.quality = quality
    ctx.reporter.set_quality(quality)
    ctx.reporter.update(message=f"{quality.metric}: {quality.baseline} -> {quality.quantized}")
    check_gate(ctx, quality)
