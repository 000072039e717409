"""Checks that exported artifacts hold the quantized model (run inside the export step).

ONNX: onnxruntime vs the PyTorch fake-quantized model on the held-out texts. Note on the size
of that difference, which can look alarming: the Q/DQ graph is exact (layer 0 matches to
1e-7), but float32 kernels in onnxruntime and PyTorch differ in the last bits, and a per-tensor
INT8 quantizer turns a 1e-7 difference into a whole quantization step for the few elements that
sit on a rounding boundary. Over ~85 quantizers that compounds layer by layer. The same happens
between two PyTorch runs whose inputs differ by 1e-6, so we report that *noise floor* next to the
onnxruntime difference: onnxruntime is right when its difference is of the same size as the
floor, and its quality against the unquantized model is what the gate should judge.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from qjob_api.capabilities import ModelTask

from .context import RunContext

log = logging.getLogger("qjob_runner.verify")

#: Reload the exported HF checkpoint and re-measure quality when the model is at most this big
#: (a full reload of a large model costs minutes); env QJOB_VERIFY_EXPORT=1/0 forces it on/off.
VERIFY_MAX_PARAMETERS = 300_000_000


def ort_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    # Keep Q/DQ nodes as written: ORT's QDQ fusions turn DQ+MatMul into integer kernels that
    # reject float8 inputs and change INT8 rounding; we want to check the graph's semantics.
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    so.intra_op_num_threads = max(1, min(4, os.cpu_count() or 1))
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def onnx_embeddings(path: Path, tokenizer, texts: list[str], seq_len: int):
    import numpy as np
    import torch

    sess = ort_session(path)
    pooled, hidden = [], []
    for i in range(0, len(texts), 16):
        enc = tokenizer(texts[i : i + 16], return_tensors="np", padding=True, truncation=True, max_length=seq_len)
        h, p = sess.run(
            None,
            {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)},
        )
        pooled.append(torch.from_numpy(p).float())
        hidden.append(torch.from_numpy(h).float())
    return torch.cat(pooled), hidden


def torch_embeddings(model, tokenizer, texts, seq_len, device, perturb: float = 0.0):
    import torch

    handle = None
    if perturb:
        emb = model.get_input_embeddings()
        gen = torch.Generator(device="cpu").manual_seed(0)

        def hook(_m, _i, out):
            noise = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
            return out * (1 + perturb * noise)

        handle = emb.register_forward_hook(hook)
    pooled, hidden = [], []
    try:
        with torch.no_grad():
            for i in range(0, len(texts), 16):
                enc = tokenizer(
                    texts[i : i + 16], return_tensors="pt", padding=True, truncation=True, max_length=seq_len
                )
                ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
                h = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
                m = mask.unsqueeze(-1).float()
                pooled.append(((h * m).sum(1) / m.sum(1).clamp(min=1e-9)).cpu())
                hidden.append(h.cpu())
    finally:
        if handle:
            handle.remove()
    return torch.cat(pooled), hidden


def _rel(a_list, b_list) -> float:
    num = sum(float((a - b).norm() ** 2) for a, b in zip(a_list, b_list, strict=True))
    den = sum(float(b.norm() ** 2) for b in b_list)
    return (num / max(den, 1e-30)) ** 0.5 if den else float("nan")


def check_onnx(ctx: RunContext, path: Path) -> dict[str, float]:
    import torch

    texts = ctx.data.eval_texts[:32] or ["quantization check sentence"]
    seq = min(ctx.data.sequence_length, 128)
    cos = torch.nn.functional.cosine_similarity
    ort_pooled, ort_hidden = onnx_embeddings(path, ctx.tokenizer, texts, seq)
    pt_pooled, pt_hidden = torch_embeddings(ctx.model, ctx.tokenizer, texts, seq, ctx.device)
    nz_pooled, nz_hidden = torch_embeddings(ctx.model, ctx.tokenizer, texts, seq, ctx.device, perturb=1e-6)
    out = {
        "onnx_vs_torch_cosine_mean": round(cos(ort_pooled, pt_pooled).mean().item(), 6),
        "onnx_vs_torch_cosine_min": round(cos(ort_pooled, pt_pooled).min().item(), 6),
        "onnx_vs_torch_hidden_rel_error": round(_rel(ort_hidden, pt_hidden), 6),
        "torch_noise_floor_hidden_rel_error": round(_rel(nz_hidden, pt_hidden), 6),
        "torch_noise_floor_cosine_mean": round(cos(nz_pooled, pt_pooled).mean().item(), 6),
    }
    # The baseline embeddings were computed at the calibration sequence length: comparable only at that length.
    if (
        isinstance(ctx.baseline, torch.Tensor)
        and ctx.baseline.shape[0] >= len(texts)
        and seq == ctx.data.sequence_length
    ):
        out["onnx_vs_unquantized_cosine_mean"] = round(cos(ort_pooled, ctx.baseline[: len(texts)]).mean().item(), 6)
    return out


def should_verify_hf(ctx: RunContext) -> bool:
    env = os.environ.get("QJOB_VERIFY_EXPORT")
    if env is not None:
        return env.lower() in {"1", "true", "yes", "on"}
    return int(ctx.metrics.get("parameters", 0)) <= VERIFY_MAX_PARAMETERS


def check_hf(ctx: RunContext, folder: Path) -> dict[str, float]:
    """Reload the exported checkpoint (dequantizing it) and re-measure quality."""
    import torch
    from transformers import AutoModel

    from .checkpoint import load_dequantized
    from .quality import embeddings, perplexity

    dtype = torch.float32  # dequantized weights in float32: the check must not add its own rounding
    device = ctx.device if ctx.device.startswith("cuda") else "cpu"
    if ctx.task == ModelTask.CAUSAL_LM:
        windows = ctx.eval_windows
        if not windows or ctx.quality is None:
            return {}
        model = load_dequantized(folder, dtype=dtype, device=device)
        ppl = perplexity(model, windows, device)
        del model
        return {
            "reloaded_perplexity": round(ppl, 6),
            "reloaded_vs_quantized_perplexity_ratio": round(ppl / ctx.quality.quantized, 6),
        }
    emb = ctx.quantized_embeddings
    if emb is None:
        return {}
    model = load_dequantized(folder, dtype=dtype, device=device, auto_class=AutoModel)
    re = embeddings(model, ctx.tokenizer, ctx.data.eval_texts, ctx.data.sequence_length, device)
    del model
    return {"reloaded_vs_quantized_cosine_mean": round(torch.nn.functional.cosine_similarity(re, emb).mean().item(), 6)}
