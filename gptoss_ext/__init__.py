"""gptoss-ext: gpt-oss inference with hand-written CUDA kernels, and a plain-PyTorch reference path."""

from __future__ import annotations

__version__ = "0.1.0"

from . import _extension

# Compare the compiled kernels (if any) with this torch and GPU first, so a mismatch fails here
# with a rebuild hint rather than later with an undefined symbol.
_extension.load_at_import()

from .checkpoint import CheckpointError, check_checkpoint, inspect_checkpoint, load_model
from .config import PRESETS, ModelConfig, get_preset
from .generate import generate
from .harmony import chat
from .model import GptOss, KVCache
from .synthetic import make_checkpoint, random_model


def info() -> dict:
    """What this installation has: package and torch versions, whether the CUDA kernels are built,
    for which GPU architectures, against which torch/CUDA, and the GPU seen now."""
    import torch

    b = _extension.build_info() or {}
    d = {
        "gptoss_ext": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "kernels_built": _extension.library_path() is not None,
        "kernels_loaded": _extension.load(strict=False),
        "kernels_error": _extension.load_error(),
        "built_against_torch": b.get("torch"),
        "built_with_cuda": b.get("cuda"),
        "built_archs": b.get("archs", []),
        "built_kernels": b.get("kernels", []),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        d["device"] = f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
    return d


__all__ = ["CheckpointError", "GptOss", "chat", "check_checkpoint", "KVCache", "ModelConfig", "PRESETS", "generate", "get_preset",
           "info", "inspect_checkpoint", "load_model", "make_checkpoint", "random_model", "__version__"]
