"""export: Hugging Face unified checkpoint, legacy TensorRT-LLM checkpoint, ONNX with Q/DQ.

Everything is written into the run's staging folder; ``report`` moves it into ``output_dir``.

ONNX (encoders): ``torch.onnx.export`` (TorchScript exporter) of the fake-quantized model gives
standard ``QuantizeLinear``/``DequantizeLinear`` pairs for INT8; for FP8 it emits TensorRT's
custom ``trt::TRT_FP8QuantizeLinear``/``TRT_FP8DequantizeLinear`` ops, which we rewrite to the
standard opset-19 ops with a ``float8e4m3fn`` zero point (the same rewrite ModelOpt's own ONNX
exporter does, without its extra dependencies), so onnxruntime and TensorRT both read the file.
"""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

from qjob_api.capabilities import ExportFormat, ModelTask

from ..context import RunContext
from ..errors import InvalidConfig, ToolMissing
from ..ranks import gather_fp8_over_gloo

log = logging.getLogger("qjob_runner.export")

ONNX_FILE = "model.onnx"
#: Shards of the HF checkpoint. sha256 is sequential within a file, so the manifest's hashing
#: parallelises over shards and only the last shard's hash is left after the export's last
#: write; ModelOpt's default (10 GB) made an 8B FP8 checkpoint one 8.6 GB file hashed after
#: the export (~9 s). Tensors larger than this get a shard of their own.
HF_SHARD_SIZE = "512MB"
#: protobuf's 2 GiB limit: larger models keep their weights in an external data file.
ONNX_EXTERNAL_DATA_BYTES = 1 << 30


def trtllm_export_available() -> bool:
    try:
        from modelopt.torch.export import export_tensorrt_llm_checkpoint  # noqa: F401
    except ImportError:
        return False
    return True


def check_available(ctx: RunContext) -> None:
    """Pre-flight (called by ``resolve``): fail before calibration, not after."""
    if ctx.ranks.distributed and set(ctx.config.export.formats) != {ExportFormat.HF}:
        raise InvalidConfig(
            f"a stage calibrated across ranks ({ctx.ranks.describe()}) exports the hf checkpoint only "
            "(ModelOpt's FSDP2-aware export)",
            "set spec.export.formats to [hf], or spec.resources.gpus so the stage runs in one pod",
        )
    if ExportFormat.TENSORRT_LLM in ctx.config.export.formats and not trtllm_export_available():
        raise ToolMissing(
            "the installed nvidia-modelopt no longer writes legacy TensorRT-LLM checkpoints",
            "remove tensorrt_llm from spec.export.formats: "
            "TensorRT-LLM's PyTorch backend loads the hf checkpoint directly",
        )


@contextmanager
def hash_shards_as_written(ctx: RunContext):
    """Hash each safetensors shard in the background as soon as transformers has written it.

    ``save_pretrained`` writes shards one after another through ``safe_save_file``; wrapping that
    one function (for this export only) lets the manifest's sha256 of shard N run while shard
    N+1 is being prepared and written. Where the hook point is missing (another transformers
    version) nothing breaks: the report step hashes whatever was not hashed here.
    """
    import transformers.modeling_utils as mu

    original = getattr(mu, "safe_save_file", None)
    if original is None or ctx.staging is None:
        yield
        return
    hashes = ctx.staging.hashes

    def save_and_hash(tensors, filename, *args, **kwargs):
        result = original(tensors, filename, *args, **kwargs)
        hashes.submit(Path(filename))
        return result

    mu.safe_save_file = save_and_hash
    try:
        yield
    finally:
        mu.safe_save_file = original


def export_hf(ctx: RunContext, dest: Path) -> None:
    import torch
    from modelopt.torch.export import export_hf_checkpoint

    model = ctx.model
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    # Sharded: every rank takes part in gathering the full state dict (no inference tensors
    # there: the gather detaches parameters), rank 0 alone writes, a barrier ends it.
    mode = torch.no_grad() if ctx.ranks.distributed else torch.inference_mode()
    with mode, warnings.catch_warnings(), hash_shards_as_written(ctx), gather_fp8_over_gloo():
        warnings.simplefilter("ignore")
        export_hf_checkpoint(model, export_dir=str(dest), max_shard_size=HF_SHARD_SIZE)
    if not ctx.ranks.is_main:
        return
    tok = ctx.tokenizer
    side = tok.padding_side
    tok.padding_side = getattr(ctx, "original_padding_side", None) or "right"
    try:
        tok.save_pretrained(str(dest))
    finally:
        tok.padding_side = side


def export_trtllm(ctx: RunContext, dest: Path) -> None:
    import torch
    from modelopt.torch.export import export_tensorrt_llm_checkpoint
    from modelopt.torch.export.model_utils import get_model_type

    decoder = get_model_type(ctx.model)
    if decoder is None:
        raise InvalidConfig(
            f"ModelOpt cannot write a TensorRT-LLM checkpoint for {type(ctx.model).__name__}",
            "export the hf checkpoint only (remove tensorrt_llm from spec.export.formats)",
        )
    dtype = next(p.dtype for p in ctx.model.parameters() if p.is_floating_point())
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_tensorrt_llm_checkpoint(
            ctx.model,
            decoder,
            dtype=dtype,
            export_dir=str(dest),
            inference_tensor_parallel=ctx.config.export.tensor_parallel_size,
            inference_pipeline_parallel=ctx.config.export.pipeline_parallel_size,
        )


class EncoderForExport:
    """Factory for the traced wrapper: (input_ids, attention_mask[, token_type_ids]) ->
    (last_hidden_state, mean-pooled sentence_embedding)."""

    @staticmethod
    def build(model):
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask):
                h = self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                mask = attention_mask.unsqueeze(-1).to(h.dtype)
                pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                return h, pooled

        return Wrapper(model).eval()


def rewrite_trt_fp8_ops(model_proto) -> int:
    """trt::TRT_FP8{Quantize,Dequantize}Linear -> standard (De)QuantizeLinear, float8e4m3fn zero point."""
    from onnx import TensorProto, helper

    zp_name = "qjob_fp8_zero_point"
    rewritten = set()
    count = 0
    for node in model_proto.graph.node:
        if node.domain == "trt" and node.op_type in {"TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear"}:
            node.op_type = node.op_type.replace("TRT_FP8", "")
            node.domain = ""
            if len(node.input) == 2:
                node.input.append(zp_name)
            rewritten.update(node.output)
            count += 1
    if count:
        model_proto.graph.initializer.append(helper.make_tensor(zp_name, TensorProto.FLOAT8E4M3FN, [], [0.0]))
        keep = [v for v in model_proto.graph.value_info if v.name not in rewritten]
        del model_proto.graph.value_info[:]
        model_proto.graph.value_info.extend(keep)
        if not any(n.domain == "trt" for n in model_proto.graph.node):
            ops = [o for o in model_proto.opset_import if o.domain != "trt"]
            del model_proto.opset_import[:]
            model_proto.opset_import.extend(ops)
    return count


def onnx_sample(ctx: RunContext, n: int = 2, seq: int = 16):
    texts = (ctx.data.eval_texts or ["quantization sample text"])[:n]
    enc = ctx.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=seq)
    return enc["input_ids"].to(ctx.device), enc["attention_mask"].to(ctx.device)


def export_onnx(ctx: RunContext, dest: Path) -> dict[str, int]:
    import onnx
    import torch

    dest.mkdir(parents=True, exist_ok=True)
    path = dest / ONNX_FILE
    wrapper = EncoderForExport.build(ctx.model)
    ids, mask = onnx_sample(ctx)
    opset = max(ctx.config.export.onnx_opset, 19)  # FP8 QuantizeLinear needs opset 19+
    tmp = dest / ".export.onnx"
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (ids, mask),
            str(tmp),
            opset_version=opset,
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state", "sentence_embedding"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "last_hidden_state": {0: "batch", 1: "sequence"},
                "sentence_embedding": {0: "batch"},
            },
        )
    proto = onnx.load(str(tmp))
    rewritten = rewrite_trt_fp8_ops(proto)
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    big = proto.ByteSize() > ONNX_EXTERNAL_DATA_BYTES
    onnx.save(
        proto,
        str(path),
        save_as_external_data=big,
        all_tensors_to_one_file=True,
        location=f"{ONNX_FILE}.data" if big else None,
    )
    for f in dest.glob(".export.onnx*"):
        f.unlink()
    for f in dest.parent.glob("*.data"):  # stray external data of the temporary file
        if f.parent == dest and f.name != f"{ONNX_FILE}.data":
            f.unlink()
    (dest / "onnx_io.json").write_text(
        json.dumps(
            {
                "inputs": ["input_ids", "attention_mask"],
                "outputs": ["last_hidden_state", "sentence_embedding"],
                "opset": opset,
                "tokenizer": "tokenizer/",
                "max_position_embeddings": getattr(ctx.model.config, "max_position_embeddings", None),
            },
            indent=2,
        )
    )
    ctx.tokenizer.save_pretrained(str(dest / "tokenizer"))
    return {
        "QuantizeLinear": ops.get("QuantizeLinear", 0),
        "DequantizeLinear": ops.get("DequantizeLinear", 0),
        "rewritten_trt_fp8_ops": rewritten,
        "opset": opset,
    }


def run(ctx: RunContext) -> None:
    staging = ctx.staging
    assert staging is not None
    # ONNX first (tracing leaves the model intact), the HF checkpoint last: ModelOpt's HF export
    # packs the weights in place, after which the in-memory model no longer runs.
    order = {ExportFormat.ONNX: 0, ExportFormat.TENSORRT_LLM: 1, ExportFormat.HF: 2}
    formats = sorted(ctx.config.export.formats, key=lambda f: order[f])
    steps = len(formats)
    from ..verify import check_hf, check_onnx, should_verify_hf

    for i, fmt in enumerate(formats):
        ctx.reporter.update(step="export", percent=None, message=f"exporting {fmt.value} ({i + 1}/{steps})")
        if fmt == ExportFormat.ONNX:
            if ctx.task != ModelTask.ENCODER:
                raise InvalidConfig("ONNX export is for encoder models", "remove onnx from spec.export.formats")
            ctx.metrics["onnx"] = export_onnx(ctx, staging.path / "onnx")
            ctx.staged["onnx"] = staging.path / "onnx"
            ctx.reporter.update(message="checking the ONNX model with onnxruntime against PyTorch")
            ctx.metrics["onnx"].update(check_onnx(ctx, staging.path / "onnx" / ONNX_FILE))
        elif fmt == ExportFormat.HF:
            export_hf(ctx, staging.path / "hf")
            ctx.staged["hf"] = staging.path / "hf"
            if ctx.ranks.is_main and should_verify_hf(ctx):
                ctx.reporter.update(message="reloading the exported checkpoint to check it")
                ctx.metrics["hf_check"] = check_hf(ctx, staging.path / "hf")
        elif fmt == ExportFormat.TENSORRT_LLM:
            export_trtllm(ctx, staging.path / "tensorrt_llm")
            ctx.staged["tensorrt_llm"] = staging.path / "tensorrt_llm"
