"""Read a ModelOpt Hugging Face unified checkpoint back into a plain transformers model.

transformers does not know ``quant_method: modelopt`` (it warns and loads the raw int8/fp8/uint8
tensors as if they were floats, which gives garbage). This loader dequantizes every quantized
linear layer from the checkpoint's own tensors (``weight``, ``weight_scale``, ``weight_scale_2``,
``pre_quant_scale``, ``input_scale``) and, by default, simulates activation quantization from
``input_scale``, so the reloaded model computes what the serving kernels will compute. It is how
the runner (and the tests) prove the exported files hold the quantized model, not just files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

E2M1_VALUES = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6])
E2M1_BOUNDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5])
FP8_MAX = 448.0


def quant_algo(folder: Path) -> tuple[str | None, int | None]:
    f = Path(folder) / "hf_quant_config.json"
    if not f.exists():
        return None, None
    q = json.loads(f.read_text()).get("quantization", {})
    return q.get("quant_algo"), q.get("group_size")


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(out/2, in) uint8 -> (out, in) int8; byte j holds rows 2j (low nibble) and 2j+1 (high)."""
    lo = (packed & 0x0F).to(torch.int8)
    hi = ((packed >> 4) & 0x0F).to(torch.int8)
    lo = torch.where(lo >= 8, lo - 16, lo)
    hi = torch.where(hi >= 8, hi - 16, hi)
    out = torch.stack([lo, hi], dim=1)  # (out/2, 2, in)
    return out.reshape(-1, packed.shape[-1])


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """(out, in/2) uint8 -> (out, in) float; low nibble is the even column."""
    values = E2M1_VALUES.to(packed.device)
    lo = values[(packed & 0x0F).long()]
    hi = values[((packed >> 4) & 0x0F).long()]
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)


def _blockwise(scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """Expand a (out, in/block) scale to (out, in)."""
    block = in_features // scale.shape[-1]
    return scale.repeat_interleave(block, dim=-1)


def dequantize_weight(tensors: dict[str, torch.Tensor], algo: str) -> torch.Tensor:
    w = tensors["weight"]
    s = tensors.get("weight_scale")
    s2 = tensors.get("weight_scale_2")
    if w.dtype == torch.float8_e4m3fn:  # FP8 per-tensor or per-channel
        s = s.float()
        return w.float() * (s if s.dim() == 0 else s.reshape(-1, 1))
    if w.dtype == torch.int8:  # INT8 SmoothQuant / weight-only, per-channel
        return w.float() * s.float().reshape(-1, 1)
    if w.dtype == torch.uint8 and algo and "NVFP4" in algo:
        vals = unpack_fp4(w)
        return vals * _blockwise(s.float(), vals.shape[-1]) * s2.float()
    if w.dtype == torch.uint8:  # INT4 AWQ (W4A16 / W4A8), packed along the output dim
        # weight = int4 * per-group weight_scale. W4A8's weight_scale_2 (amax/448) is the scale of
        # the FP8 re-expression the kernel uses for the FP8 GEMM, not a further factor.
        vals = unpack_int4(w).float()
        return vals * _blockwise(s.float(), vals.shape[-1])
    return w.float()


def _round_e2m1(x: torch.Tensor) -> torch.Tensor:
    mag = x.abs()
    idx = torch.searchsorted(E2M1_BOUNDS.to(x.device), mag.contiguous())
    return E2M1_VALUES[:8].to(x.device)[idx] * torch.sign(x)


def fake_quant_activation(x: torch.Tensor, scale: torch.Tensor, algo: str) -> torch.Tensor:
    scale = scale.float().to(x.device)
    xf = x.float()
    if algo and "NVFP4" in algo:  # dynamic 16-element blocks, FP8 block scales under a global scale
        shape = xf.shape
        blocks = xf.reshape(-1, 16)
        amax = blocks.abs().amax(-1, keepdim=True)
        bscale = (amax / 6.0 / scale).clamp(max=FP8_MAX).to(torch.float8_e4m3fn).float() * scale
        q = _round_e2m1(blocks / torch.where(bscale == 0, torch.ones_like(bscale), bscale)) * bscale
        return q.reshape(shape).to(x.dtype)
    if algo and ("INT8" in algo or "W8A8" in algo):
        return ((xf / scale).round().clamp(-128, 127) * scale).to(x.dtype)
    # FP8 (FP8, W4A8_AWQ)
    return ((xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


class DequantizedLinear(torch.nn.Module):
    def __init__(self, weight, bias, pre_quant_scale, input_scale, algo, simulate_activations):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.register_buffer("pre_quant_scale", pre_quant_scale)
        self.register_buffer("input_scale", input_scale if simulate_activations else None)
        self.algo = algo

    def forward(self, x):
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale.to(x.dtype)
        if self.input_scale is not None:
            x = fake_quant_activation(x, self.input_scale, self.algo)
        return torch.nn.functional.linear(
            x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)
        )


def load_dequantized(
    folder: str | Path, dtype=torch.float32, device: str = "cpu", simulate_activations: bool = True, auto_class=None
):
    """A transformers model whose quantized linears compute from the checkpoint's quantized tensors."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    algo, _ = quant_algo(folder)
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # transformers cannot read modelopt's; we do it here
    cls = auto_class or AutoModelForCausalLM
    with torch.device(device):  # every tensor is overwritten below; building on the device is fast
        model = cls.from_config(config, dtype=dtype)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt", device="cpu") as sf:
            for k in sf.keys():  # noqa: SIM118 - a safe_open handle has keys() but is not iterable
                tensors[k] = sf.get_tensor(k)
    # Group quantized linear tensors by module prefix.
    quantized = {k[: -len(".weight_scale")] for k in tensors if k.endswith(".weight_scale")}
    for name in sorted(quantized):
        parts = {
            k[len(name) + 1 :]: v
            for k, v in tensors.items()
            if k.startswith(name + ".") and "." not in k[len(name) + 1 :]
        }
        weight = dequantize_weight(parts, algo).to(dtype)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        bias = parts.get("bias")
        layer = DequantizedLinear(
            weight.to(device),
            None if bias is None else bias.to(dtype).to(device),
            None if parts.get("pre_quant_scale") is None else parts["pre_quant_scale"].float().to(device),
            None if parts.get("input_scale") is None else parts["input_scale"].float().to(device),
            algo,
            simulate_activations,
        )
        setattr(parent, child, layer)
        for k in parts:
            tensors.pop(f"{name}.{k}")
    # Remaining tensors are plain weights; KV cache scales (k_scale/v_scale) are for the runtime.
    rest = {
        k: v.to(dtype) if v.is_floating_point() else v
        for k, v in tensors.items()
        if not k.endswith(("k_scale", "v_scale"))
    }
    missing, unexpected = model.load_state_dict({k: v.to(device) for k, v in rest.items()}, strict=False)
    missing = [k for k in missing if k.rpartition(".")[0] not in quantized]
    if getattr(config, "tie_word_embeddings", False):
        missing = [k for k in missing if "lm_head" not in k]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {folder} does not match {type(model).__name__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.to(device).eval()
