"""Quality measures shared by the evaluate step and the export checks (``verify``).

Causal LMs: perplexity over non-overlapping windows of held-out text. Encoders: mean-pooled
embeddings of the held-out texts.
"""

from __future__ import annotations

import math

from .context import RunContext

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
