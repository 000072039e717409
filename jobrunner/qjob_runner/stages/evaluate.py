"""baseline / evaluate: quality before and after quantization, and the quality gate.

Causal LMs: perplexity on held-out text (never used for calibration), as non-overlapping windows
of the calibration sequence length. Encoders: mean-pooled embeddings of the held-out texts,
cosine similarity of quantized vs unquantized. ``baseline`` runs before ``quantize`` (which
changes the model in place); ``evaluate`` runs after it and *before* export (ModelOpt's export
replaces weights with packed integers, after which the in-memory model no longer runs).
"""

from __future__ import annotations

import logging
import math

from qjob_api.capabilities import ModelTask
from qjob_api.v1alpha1 import Quality

from ..context import RunContext
from ..errors import QualityGateFailed

log = logging.getLogger("qjob_runner.evaluate")

EVAL_BATCH = 4


def perplexity_windows(ctx: RunContext) -> list:
    import torch

    texts = ctx.data.eval_texts
    if not texts:
        return []
    tok = ctx.tokenizer
    sep = tok.eos_token or "\n\n"
    ids = tok(sep.join(texts), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    window = ctx.data.sequence_length
    n = min(len(ids) // window, ctx.config.evaluation.samples)
    if n == 0:
        window, n = len(ids), 1
    return [
        torch.stack([ids[(i + j) * window : (i + j + 1) * window] for j in range(min(EVAL_BATCH, n - i))])
        for i in range(0, n, EVAL_BATCH)
    ]


def perplexity(model, windows, device: str) -> float:
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in windows:
            batch = batch.to(device)
            logits = model(input_ids=batch).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            nll += loss.item()
            count += batch[:, 1:].numel()
    return math.exp(nll / max(1, count))


def embeddings(model, tokenizer, texts: list[str], seq_len: int, device: str):
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(texts), EVAL_BATCH * 4):
            enc = tokenizer(
                texts[i : i + EVAL_BATCH * 4], return_tensors="pt", padding=True, truncation=True, max_length=seq_len
            )
            enc = {k: v.to(device) for k, v in enc.items() if k in {"input_ids", "attention_mask", "token_type_ids"}}
            h = model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append(((h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).cpu())
    return torch.cat(out) if out else None


def run_baseline(ctx: RunContext) -> None:
    if not ctx.config.evaluation.enabled or not ctx.data.eval_texts:
        return
    ctx.reporter.update(step="evaluate", message="measuring the unquantized model on held-out text")
    if ctx.task == ModelTask.CAUSAL_LM:
        ctx.metrics["_windows"] = perplexity_windows(ctx)
        ctx.baseline = perplexity(ctx.model, ctx.metrics["_windows"], ctx.device)
    else:
        ctx.baseline = embeddings(ctx.model, ctx.tokenizer, ctx.data.eval_texts, ctx.data.sequence_length, ctx.device)


def check_gate(ctx: RunContext, quality: Quality) -> None:
    gate = ctx.config.evaluation.gate
    if gate is None:
        return
    failures = []
    if gate.max_perplexity_increase is not None and quality.metric == "perplexity" and quality.degradation is not None:
        if quality.degradation > gate.max_perplexity_increase:
            failures.append(
                f"perplexity rose {quality.degradation:.2%} ({quality.baseline:.3f} -> {quality.quantized:.3f}), "
                f"more than maxPerplexityIncrease {gate.max_perplexity_increase:.2%}"
            )
    if (
        gate.min_cosine_similarity is not None
        and quality.metric == "cosine_similarity"
        and quality.quantized is not None
    ):
        if quality.quantized < gate.min_cosine_similarity:
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
        windows = ctx.metrics.pop("_windows")
        q = perplexity(ctx.model, windows, ctx.device)
        quality = Quality(
            metric="perplexity",
            baseline=round(ctx.baseline, 6),
            quantized=round(q, 6),
            degradation=round(q / ctx.baseline - 1.0, 6),
        )
        ctx.metrics["eval_tokens"] = int(sum(w.numel() for w in windows))
        ctx.metrics["_eval_windows"] = windows  # reused to check the exported checkpoint
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
        ctx.metrics["_quantized_embeddings"] = emb
    ctx.quality = quality
    ctx.reporter.set_quality(quality)
    ctx.reporter.update(message=f"{quality.metric}: {quality.baseline} -> {quality.quantized}")
    check_gate(ctx, quality)
