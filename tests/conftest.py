"""Shared fixtures. GPU tests carry the `gpu` marker and are skipped, with the reason, where there
is no CUDA device or no compiled kernels. The tokenizer is the package's own embedded o200k_base
(a $GPTOSS_TIKTOKEN_FILE set by the caller overrides it). Nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# Never touch the network from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_report_header(config):
    import gptoss_ext

    i = gptoss_ext.info()
    return [f"gptoss_ext {i['gptoss_ext']}, torch {i['torch']}, kernels built: {i['kernels_built']} "
            f"({', '.join(i['built_archs']) or '-'}), loaded: {i['kernels_loaded']}, "
            f"cuda: {i['cuda_available']} {i.get('device', '')}",
            f"tokenizer: {os.environ.get('GPTOSS_TIKTOKEN_FILE') or 'the package embedded o200k_base'}"]


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


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> str:
    """A plain o200k_base.tiktoken file: the caller's $GPTOSS_TIKTOKEN_FILE, else the package's
    embedded copy decompressed (the openai-harmony reference renderer reads one by path)."""
    import lzma

    from gptoss_ext import tokenizer

    given = os.environ.get("GPTOSS_TIKTOKEN_FILE")
    if given and given != "tiktoken":
        return given
    path = tmp_path_factory.mktemp("vocab") / "o200k_base.tiktoken"
    path.write_bytes(lzma.decompress(tokenizer.EMBEDDED_RANKS.read_bytes()))
    return str(path)


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
