"""Shared fixtures. GPU tests carry the `gpu` marker and are skipped, with the reason, where there
is no CUDA device or no compiled kernels. The tokenizer is pointed at a local o200k_base file
($GPTOSS_TIKTOKEN_FILE, else ../shared/tokenizer/o200k_base.tiktoken beside the checkout); tests
that need it are skipped with the reason when neither exists. Nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
_CANDIDATES = [os.environ.get("GPTOSS_TIKTOKEN_FILE"),
               str(ROOT.parent / "shared" / "tokenizer" / "o200k_base.tiktoken"),
               str(ROOT / "shared" / "tokenizer" / "o200k_base.tiktoken")]
TOKENIZER_FILE = next((p for p in _CANDIDATES if p and Path(p).is_file()), None)
if TOKENIZER_FILE:
    os.environ["GPTOSS_TIKTOKEN_FILE"] = TOKENIZER_FILE

# Never touch the network from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_report_header(config):
    import gptoss_ext

    i = gptoss_ext.info()
    return [f"gptoss_ext {i['gptoss_ext']}, torch {i['torch']}, kernels built: {i['kernels_built']} "
            f"({', '.join(i['built_archs']) or '-'}), loaded: {i['kernels_loaded']}, "
            f"cuda: {i['cuda_available']} {i.get('device', '')}",
            f"tokenizer file: {TOKENIZER_FILE or 'none found (tokenizer tests skip)'}"]


def gpu_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device on this machine"
    from gptoss_ext import _extension

    if not _extension.available():
        return f"CUDA kernels not available: {_extension.load_error()}"
    return None


def pytest_collection_modifyitems(config, items):
    reason = gpu_skip_reason()
    if reason:
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def tokenizer_file():
    if not TOKENIZER_FILE:
        pytest.skip("no local o200k_base.tiktoken (set GPTOSS_TIKTOKEN_FILE)")
    return TOKENIZER_FILE


@pytest.fixture(scope="session")
def tiny_fp32():
    from gptoss_ext import random_model

    return random_model("tiny", seed=0, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_bf16():
    from gptoss_ext import random_model

    return random_model("tiny", seed=0, dtype=torch.bfloat16)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
