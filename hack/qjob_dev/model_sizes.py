"""Sizes of public checkpoints as the fetch or inspect stage reports them (``ModelSize``), from their
config.json values, for the sizing tests and benchmarks/sizing_plans.py."""

from __future__ import annotations

from qjob_api.v1alpha1 import ModelSize


def llm_size(
    params: float, layers: int, hidden: int, inter: int, vocab: int, kv_heads: int, head_dim: int
) -> ModelSize:
    """A decoder LLM of ``params`` BF16 parameters (2 bytes each)."""
    return ModelSize(
        weight_bytes=int(params * 2),
        parameters=int(params),
        dtype="BF16",
        layers=layers,
        hidden_size=hidden,
        intermediate_size=inter,
        vocab_size=vocab,
        kv_heads=kv_heads,
        head_dim=head_dim,
    )


TINYLLAMA = llm_size(1_100_048_384, 22, 2048, 5632, 32000, 4, 64)  # TinyLlama/TinyLlama-1.1B-Chat-v1.0
LLAMA_8B = llm_size(8_030_261_248, 32, 4096, 14336, 128256, 8, 128)  # meta-llama/Llama-3.1-8B
LLAMA_70B = llm_size(70.6e9, 80, 8192, 28672, 128256, 8, 128)  # meta-llama/Llama-3.1-70B
LLAMA_405B = llm_size(405.9e9, 126, 16384, 53248, 128256, 8, 128)  # meta-llama/Llama-3.1-405B
# deepseek-ai/DeepSeek-V3: ModelOpt calibrates it from BF16 weights (its FP8 checkpoint is
# dequantized first).
DEEPSEEK_V3 = llm_size(671e9, 61, 7168, 18432, 129280, 128, 128)
