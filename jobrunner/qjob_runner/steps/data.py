"""data: calibration text -> tokenised, left-padded batches; held-out text for evaluation.

Sources: a JSON Lines file (one object per line with a ``text`` field), a plain text file
(paragraphs separated by blank lines), or a Hugging Face dataset when ``datasets`` is installed:
read from the model cache where the fetch stage streamed it, else streamed from the Hub here.
The *last* ``evaluation.samples`` texts are held out and never used for calibration. Batch size 0
picks the largest batch that fits on the GPU (a fixed small batch on CPU).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from qjob_api.capabilities import QuantFormat
from qjob_api.runner import REUSE_STAGE, RunnerConfig
from qjob_api.v1alpha1 import HuggingFaceDataset

from .. import modelcache
from ..context import CalibData, RunContext
from ..errors import InvalidConfig, InvalidInput, TransientError
from ..ranks import agree_min, shard

log = logging.getLogger("qjob_runner.data")

CPU_BATCH_SIZE = 4
#: Samples in the one forward pass that measures activation memory for ``batchSize: 0``.
PROBE_BATCH = 4
#: Share of each GPU's memory that weights plus calibration activations may fill.
PROBE_MEMORY_FRACTION = 0.8
#: Calibration activations per sample, in plain forward passes: max calibration adds a
#: temporary the size of each quantizer's input; AWQ scores several scales per layer and
#: SmoothQuant keeps per-channel statistics. Heuristic factors on the probe's measurement.
MAX_CALIBRATION = 1.5
HEAVY_CALIBRATION = {
    QuantFormat.INT4_AWQ: 3.0,
    QuantFormat.W4A8_AWQ: 3.0,
    QuantFormat.NVFP4_AWQ: 3.0,
    QuantFormat.INT8_SMOOTHQUANT: 3.0,
}


def read_file_texts(path: Path, field: str = "text") -> list[str]:
    """A JSON Lines file (one object per line with a string ``field``) or plain text (paragraphs)."""
    if not path.is_file():
        raise InvalidInput(
            f"calibration file {path} does not exist",
            "check spec.calibration.dataset (pvc path or configMap key); it must be a .jsonl or .txt file",
        )
    raw = path.read_text(errors="replace")
    if not (path.suffix in {".jsonl", ".json"} or raw.lstrip().startswith("{")):
        return [p.strip() for p in raw.split("\n\n") if p.strip()]
    texts: list[str] = []
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
    return texts


def stream_hub_texts(hf: HuggingFaceDataset, needed: int, revision: str | None = None) -> list[str]:
    """The first ``needed`` non-empty texts of a Hub dataset split, streamed (nothing else is downloaded)."""
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
            hf.name,
            hf.config,
            split=hf.split,
            streaming=True,
            revision=revision or hf.revision,
            token=os.environ.get("HF_TOKEN") or None,
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
            "check spec.calibration.dataset.huggingFace (name, revision, config, split, textField)",
        ) from None
    return texts


def read_texts(ctx: RunContext, needed: int) -> tuple[list[str], str]:
    ds = ctx.config.calibration.dataset
    if ds.path:
        field = ds.hugging_face.text_field if ds.hugging_face else "text"
        return read_file_texts(Path(ds.path), field), str(ds.path)
    if ds.hugging_face:
        hf = ds.hugging_face
        source = f"hf://{hf.name}/{hf.config or ''}:{hf.split}"
        if ctx.config.model.cache_dir and ctx.stage not in (modelcache.FETCH_STAGE, REUSE_STAGE):
            return read_file_texts(modelcache.dataset_lookup(ctx, needed)), source  # the fetch stage streamed them
        return stream_hub_texts(hf, needed), source
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


def forward_kwargs(model) -> dict:
    """Extra arguments for calibration forward passes: logits for the last position only.

    Calibration needs the activations the quantizers see, not the logits, and every ModelOpt
    preset leaves the output layer unquantized. Full logits are Llama-3's largest activation
    (seq x 128k vocabulary per sample: 17 GB per 128 x 512 tokens in bf16), so skipping them
    lets batches grow. When some quantizer of the output layer is enabled the full logits stay.
    """
    import inspect

    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None or "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return {}
    if any(n.endswith("_quantizer") and getattr(m, "is_enabled", False) for n, m in out.named_modules()):
        return {}
    return {"logits_to_keep": 1}


def activation_factor(ctx: RunContext) -> float:
    """How many plain forward passes' activations calibration holds at once (a heuristic)."""
    q = ctx.config.quantization
    if q.auto_quantize is not None:
        return 4.0  # gradient scores: a backward pass through the model
    if q.algorithm == "max":
        return MAX_CALIBRATION
    return HEAVY_CALIBRATION.get(q.format, MAX_CALIBRATION)


def probe_batch_size(ctx: RunContext, texts: list[str], seq_len: int) -> int:
    """The largest power-of-two batch (at most the sample count) whose calibration fits.

    Fewer, larger batches mean fewer of ModelOpt's per-quantizer reductions for the same data
    (calibration at small batches is CPU-bound). One forward pass at PROBE_BATCH samples of
    full length measures the activation memory per sample on each GPU; memory is linear in the
    batch, so the largest batch whose predicted peak stays under PROBE_MEMORY_FRACTION of every
    GPU is chosen, with the calibration algorithm's extra activations (``activation_factor``).
    """
    import torch

    if not torch.cuda.is_available():
        return CPU_BATCH_SIZE
    model, tok = ctx.model, ctx.tokenizer
    n = max(1, len(texts))
    sample = (texts * (PROBE_BATCH // n + 1))[:PROBE_BATCH]
    enc = tok(sample, return_tensors="pt", padding="max_length", truncation=True, max_length=seq_len)
    enc = {k: v.to(ctx.device) for k, v in enc.items() if k in {"input_ids", "attention_mask"}}
    # one rank of several measures its own GPU (each process sees every GPU of its pod)
    devices = [ctx.ranks.local_rank] if ctx.ranks.distributed else range(torch.cuda.device_count())
    torch.cuda.synchronize()
    base = [torch.cuda.memory_allocated(i) for i in devices]
    for i in devices:
        torch.cuda.reset_peak_memory_stats(i)
    try:
        with torch.no_grad():
            model(**enc, **forward_kwargs(model))
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return 1
    per_sample = [
        (torch.cuda.max_memory_allocated(i) - base[i]) / PROBE_BATCH * activation_factor(ctx) for i in devices
    ]
    room = [torch.cuda.get_device_properties(i).total_memory * PROBE_MEMORY_FRACTION - base[i] for i in devices]
    torch.cuda.empty_cache()
    fits = min(int(r // p) if p > 0 else n for r, p in zip(room, per_sample, strict=True))
    bs = 1
    while bs * 2 <= min(fits, n):
        bs *= 2
    if bs < n <= fits:
        bs = n  # one batch holds every sample
    log.info(
        "batch size probe: %.0f MiB per sample on the fullest GPU; %d fit; using %d",
        max(per_sample) / 2**20,
        fits,
        bs,
    )
    return max(1, bs)


def samples_needed(config: RunnerConfig) -> int:
    """Calibration samples plus the held-out ones."""
    cal, ev = config.calibration, config.evaluation
    return cal.samples + (ev.samples if ev.enabled else 0)


def select_texts(ctx: RunContext) -> tuple[list[str], list[str], str]:
    """(calibration texts, held-out texts, source name): what the job calibrates and evaluates on."""
    cal, ev = ctx.config.calibration, ctx.config.evaluation
    needed = samples_needed(ctx.config)
    texts, source = read_texts(ctx, needed)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InvalidInput(f"calibration source {source} holds no text", "fill the file with text samples")
    calib, held_out = split_texts(texts[:needed], cal.samples, ev.samples, ev.enabled)
    return calib[: cal.samples], held_out, source


def texts_digest(calib: list[str], held_out: list[str]) -> str:
    """The calibration data's part of the work key: the texts themselves, wherever they came from."""
    return "sha256:" + hashlib.sha256(json.dumps([calib, held_out], ensure_ascii=False).encode()).hexdigest()


def run(ctx: RunContext) -> None:
    cal = ctx.config.calibration
    calib, held_out, source = select_texts(ctx)
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
    bs = cal.batch_size or agree_min(probe_batch_size(ctx, calib, seq_len), ctx.ranks)
    bs = max(1, min(bs, len(calib)))
    # Several ranks: the same batches as one process would make, each rank calibrating on its share.
    ctx.data = CalibData(
        batches=shard(tokenize(ctx.tokenizer, calib, seq_len, bs, ctx.device), ctx.ranks),
        batch_size=bs,
        num_samples=len(calib),
        sequence_length=seq_len,
        eval_texts=held_out,
        source=source,
        digest=texts_digest(calib, held_out),
    )
    ctx.metrics["calibration"] = {
        "samples": len(calib),
        "batch_size": bs,
        "sequence_length": seq_len,
        "held_out": len(held_out),
        "source": source,
    }
    if ctx.ranks.distributed:
        ctx.metrics["calibration"]["batches_per_rank"] = len(ctx.data.batches)
    ctx.reporter.update(message=f"{len(calib)} calibration samples in batches of {bs}; {len(held_out)} held out")
