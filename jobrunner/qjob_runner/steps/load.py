"""load: tokenizer and model, in the configured dtype, spread over the pod's GPUs.

``device_map="auto"`` (accelerate) places the layers across every visible GPU when the model does
not fit on one; a per-GPU memory cap leaves room for calibration activations.
"""

from __future__ import annotations

import logging

from qjob_api.capabilities import ModelTask

from ..context import RunContext
from ..errors import InvalidConfig, InvalidInput
from ..ranks import device_for

log = logging.getLogger("qjob_runner.load")

#: Fraction of each GPU's memory the weights may take; the rest is for activations/calibration.
WEIGHT_MEMORY_FRACTION = 0.80


def torch_dtype(name: str, on_cuda: bool):
    import torch

    if name == "auto":
        # The checkpoint's dtype on GPUs; float32 on CPU, where bf16 matmuls are slow and
        # some ModelOpt CPU paths are float32 only.
        return "auto" if on_cuda else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def device_map_for(on_cuda: bool):
    import torch

    if not on_cuda:
        return None, None
    n = torch.cuda.device_count()
    max_memory = {i: int(torch.cuda.get_device_properties(i).total_memory * WEIGHT_MEMORY_FRACTION) for i in range(n)}
    return "auto", max_memory


def load_tokenizer(ctx: RunContext):
    from transformers import AutoTokenizer

    folder = ctx.paths.model_dir
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=ctx.config.model.trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidInput(
            f"cannot load the tokenizer from {folder}: {exc}",
            "copy the tokenizer files (tokenizer.json, tokenizer_config.json) from the original model repository",
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    ctx.original_padding_side = tok.padding_side
    tok.padding_side = "left"  # ModelOpt's recommendation for calibration (lower accuracy loss)
    return tok


def load_model(ctx: RunContext):
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    on_cuda = torch.cuda.is_available()
    dtype = torch_dtype(ctx.config.model.dtype, on_cuda)
    device_map, max_memory = device_map_for(on_cuda)
    cls = AutoModelForCausalLM if ctx.task == ModelTask.CAUSAL_LM else AutoModel
    folder = ctx.paths.model_dir
    try:
        model = cls.from_pretrained(
            folder,
            dtype=dtype,
            device_map=device_map,
            max_memory=max_memory,
            trust_remote_code=ctx.config.model.trust_remote_code,
            low_cpu_mem_usage=True,
        )
    except (OSError, ValueError, KeyError) as exc:
        text = str(exc)
        if "safetensor" in text.lower() or "header" in text.lower() or "deserializ" in text.lower():
            raise InvalidInput(
                f"cannot read the weights in {folder}: {text[:400]}",
                "re-upload the model's safetensors files; they are corrupt or incomplete",
            ) from None
        raise InvalidInput(
            f"cannot load the model from {folder}: {text[:400]}",
            f"check that {folder} is a complete Hugging Face model folder for task {ctx.task.value}",
        ) from None
    model.eval()
    # A model built from a config has config.architectures None; ModelOpt's HF export needs it.
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    ctx.device = str(next(model.parameters()).device)
    return model


def load_sharded(ctx: RunContext):
    """The model sharded over the stage's ranks with FSDP2 (ModelOpt's parallel loader: each rank
    reads its round-robin share of the decoder layers and broadcasts them; embeddings, norm and
    lm_head are sharded too). Causal LMs with safetensors weights only, as ModelOpt's loader."""
    import torch
    from modelopt.torch.utils.plugins.model_load_utils import parallel_load_and_prepare_fsdp2
    from transformers import AutoConfig

    if ctx.task != ModelTask.CAUSAL_LM:
        raise InvalidConfig(
            f"only causal LMs are calibrated across ranks ({ctx.ranks.describe()}); this is a {ctx.task.value} model",
            "set spec.resources.gpus to a number so the stage runs in one pod",
        )
    folder = ctx.paths.model_dir
    on_cuda = torch.cuda.is_available()
    config = AutoConfig.from_pretrained(folder, trust_remote_code=ctx.config.model.trust_remote_code)
    dtype = torch_dtype(ctx.config.model.dtype, on_cuda)
    config.torch_dtype = getattr(config, "torch_dtype", None) if dtype == "auto" else dtype
    ctx.device = device_for(ctx.ranks)
    try:
        model = parallel_load_and_prepare_fsdp2(
            str(folder),
            torch.device(ctx.device),
            ctx.ranks.rank,
            ctx.ranks.world_size,
            trust_remote_code=ctx.config.model.trust_remote_code,
            hf_config=config,
        )
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidInput(
            f"cannot load the model from {folder} sharded over {ctx.ranks.world_size} ranks: {str(exc)[:400]}",
            f"check that {folder} is a complete Hugging Face causal-LM folder with safetensors weights",
        ) from None
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__.removeprefix("FSDP")]
    return model


def run(ctx: RunContext) -> None:
    from .quantize import _mtq

    _mtq()  # a missing ModelOpt fails before seconds of model loading, not after
    ctx.reporter.update(message="loading tokenizer")
    ctx.tokenizer = load_tokenizer(ctx)
    ctx.reporter.update(message="loading model")
    ctx.model = load_sharded(ctx) if ctx.ranks.distributed else load_model(ctx)
    n = sum(p.numel() for p in ctx.model.parameters())  # a DTensor counts its global size
    ctx.metrics["parameters"] = n
    device_map = getattr(ctx.model, "hf_device_map", None) or {}
    ctx.metrics["devices"] = sorted({str(v) for v in device_map.values()}) or [ctx.device]
    ctx.reporter.update(message=f"loaded {n / 1e6:.1f}M parameters on {ctx.device}")
