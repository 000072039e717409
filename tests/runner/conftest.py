from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from qjob_dev.tiny_models import make_tiny_llama, pydoc_paragraphs, write_jsonl  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(int(os.environ.get("QJOB_TEST_THREADS", "2")))
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Random-weight tiny Llama (2 layers, hidden 128) with a pydoc BPE tokenizer."""
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def trained_llama(tmp_path_factory) -> Path:
    """The same shape trained for a few hundred steps on pydoc text (perplexity means something)."""
    return make_tiny_llama(
        tmp_path_factory.mktemp("models") / "trained-llama",
        train_steps=int(os.environ.get("QJOB_TEST_TRAIN_STEPS", "200")),
    )


@pytest.fixture(scope="session")
def calib_jsonl(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "calib.jsonl", pydoc_paragraphs()[:400])


@pytest.fixture
def s3_creds(s3_server, monkeypatch):
    monkeypatch.setenv("QJOB_S3_OUTPUT_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("QJOB_S3_OUTPUT_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("QJOB_S3_MODEL_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("QJOB_S3_MODEL_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # unreachable-endpoint cases fail in seconds
