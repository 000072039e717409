"""data: calibration text -> tokenised, left-padded batches; held-out text for evaluation.

Sources: a JSON Lines file (one object per line with a ``text`` field), a plain text file
(paragraphs separated by blank lines), or a Hugging Face dataset when ``datasets`` is installed
and the Hub is reachable. The *last* ``evaluation.samples`` texts are held out and never used for
calibration. Batch size 0 probes the largest batch that fits on the GPU (a fixed small batch on CPU).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..context import CalibData, RunContext
from ..errors import InvalidConfig, InvalidInput, TransientError

log = logging.getLogger("qjob_runner.data")

CPU_BATCH_SIZE = 4
PROBE_START = 64
#: After probing, keep this fraction of the largest batch that fitted: AWQ/SmoothQuant
#: calibration holds more activations than a plain forward pass.
PROBE_SAFETY = 0.5


def read_texts(ctx: RunContext, needed: int) -> tuple[list[str], str]:
    ds = ctx.config.calibration.dataset
    if ds.path:
        path = Path(ds.path)
        if not path.is_file():
            raise InvalidInput(
                f"calibration file {path} does not exist",
                "check spec.calibration.dataset (pvc path or configMap key); it must be a .jsonl or .txt file",
            )
        field = ds.hugging_face.text_field if ds.hugging_face else "text"
        raw = path.read_text(errors="replace")
        texts: list[str] = []
        if path.suffix in {".jsonl", ".json"} or raw.lstrip().startswith("{"):
            for n, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    raise InvalidInput(
                        f"{path} line {n} is not JSON", 'write one JSON object per line, e.g. {"text": "..."}'
                    ) from None
                if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                    raise InvalidInput(
                        f"{path} line {n} has no string field {field!r}",
                        f'write one JSON object per line with a "{field}" field',
                    )
                texts.append(obj[field])
        else:
            texts = [p.strip() for p in raw.split("\n\n") if p.strip()]
        return texts, str(path)
    if ds.hugging_face:
        hf = ds.hugging_face
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise InvalidConfig(
                "a Hugging Face calibration dataset needs the `datasets` library, which this image lacks",
                "use a .jsonl/.txt file (spec.calibration.dataset.pvc or configMap)",
            ) from None
        from datasets import load_dataset

        try:
            d = load_dataset(
                hf.name, hf.config, split=hf.split, streaming=True, token=os.environ.get("HF_TOKEN") or None
            )
            texts = []
            for row in d:
                if isinstance(row.get(hf.text_field), str) and row[hf.text_field].strip():
                    texts.append(row[hf.text_field])
                if len(texts) >= needed:
                    break
        except (ConnectionError, TimeoutError) as exc:
            raise TransientError(f"cannot reach dataset {hf.name}: {exc}", "retried; or use a file on a PVC") from None
        except Exception as exc:  # noqa: BLE001 - datasets raises many types
            raise InvalidInput(
                f"cannot read dataset {hf.name} split {hf.split}: {exc}",
                "check spec.calibration.dataset.huggingFace (name, config, split, textField)",
            ) from None
        return texts, f"hf://{hf.name}/{hf.config or ''}:{hf.split}"
    raise InvalidConfig("no calibration dataset", "set spec.calibration.dataset")


def split_texts(texts: list[str], calib_n: int, eval_n: int, evaluate: bool) -> tuple[list[str], list[str]]:
    """Hold out the last ``eval_n`` texts (at most a quarter of a small set), calibrate on the rest."""
    if not evaluate or eval_n == 0:
        return texts, []
    hold = eval_n if len(texts) >= calib_n + eval_n else min(eval_n, max(1, len(texts) // 4))
    return texts[: len(texts) - hold], texts[len(texts) - hold :]


def tokenize(tokenizer, texts: list[str], seq_len: int, batch_size: int, device: str) -> list[dict]:
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=seq_len
        )
        batches.append(
            {k: v.to(device) for k, v in enc.items() if k in {"input_ids", "attention_mask", "token_type_ids"}}
        )
    return batches


def probe_batch_size(ctx: RunContext, texts: list[str], seq_len: int) -> int:
    """Largest power-of-two batch (<= PROBE_START) whose forward pass fits, times PROBE_SAFETY."""
    import torch

    if not torch.cuda.is_available():
        return CPU_BATCH_SIZE
    model, tok = ctx.model, ctx.tokenizer
    sample = (texts * (PROBE_START // max(1, len(texts)) + 1))[:PROBE_START]
    bs = min(PROBE_START, 1 << (max(1, len(texts)) - 1).bit_length())
    while bs >= 1:
        try:
            enc = tok(sample[:bs], return_tensors="pt", padding="max_length", truncation=True, max_length=seq_len)
            enc = {k: v.to(ctx.device) for k, v in enc.items() if k in {"input_ids", "attention_mask"}}
            torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                model(**enc)
            peak = max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
            total = min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
            if peak < 0.9 * total:
                chosen = max(1, int(bs * PROBE_SAFETY))
                log.info("batch size probe: %d fits (peak %.1f GiB); using %d", bs, peak / 2**30, chosen)
                return chosen
        except torch.cuda.OutOfMemoryError:
            pass
        finally:
            torch.cuda.empty_cache()
        bs //= 2
    raise torch.cuda.OutOfMemoryError("even batch size 1 does not fit for calibration")


def run(ctx: RunContext) -> None:
    cal, ev = ctx.config.calibration, ctx.config.evaluation
    needed = cal.samples + (ev.samples if ev.enabled else 0)
    texts, source = read_texts(ctx, needed)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InvalidInput(f"calibration source {source} holds no text", "fill the file with text samples")
    calib, held_out = split_texts(texts[:needed], cal.samples, ev.samples, ev.enabled)
    calib = calib[: cal.samples]
    if len(calib) < cal.samples:
        log.warning(
            "calibration source %s has %d samples, fewer than the %d asked for", source, len(calib), cal.samples
        )
        ctx.notes.append(f"calibration used {len(calib)} samples (source has fewer than {cal.samples})")
    seq_len = cal.sequence_length
    max_pos = getattr(ctx.model.config, "max_position_embeddings", None)
    if max_pos and seq_len > max_pos:
        ctx.notes.append(f"sequence length capped at the model's max_position_embeddings {max_pos}")
        seq_len = max_pos
    bs = cal.batch_size or probe_batch_size(ctx, calib, seq_len)
    bs = max(1, min(bs, len(calib)))
    ctx.data = CalibData(
        batches=tokenize(ctx.tokenizer, calib, seq_len, bs, ctx.device),
        batch_size=bs,
        num_samples=len(calib),
        sequence_length=seq_len,
        eval_texts=held_out,
        source=source,
    )
    ctx.metrics["calibration"] = {
        "samples": len(calib),
        "batch_size": bs,
        "sequence_length": seq_len,
        "held_out": len(held_out),
        "source": source,
    }
    ctx.reporter.update(message=f"{len(calib)} calibration samples in batches of {bs}; {len(held_out)} held out")
