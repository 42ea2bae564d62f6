"""Finding and loading the compiled kernels (gptoss_ext/_C.so) with their build record.

The build embeds a record in the library (a GPTOSS_BUILD_INFO string): the torch and CUDA versions it was compiled
against and the GPU architectures in it. At import the record is compared with the running torch
and GPU; a mismatch raises `ExtensionError` saying how to rebuild, instead of an `undefined symbol`
or a "no kernel image is available" deep inside a call. GPTOSS_EXT_DISABLE=1 skips the kernels.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
REBUILD = "rebuild it with `pip install --no-build-isolation -e .` (or set GPTOSS_EXT_DISABLE=1 to run the reference ops)"


class ExtensionError(ImportError):
    """The compiled kernels exist but cannot be used with this torch / GPU."""


_state = {"loaded": False, "error": None, "info": None, "tried": False}


def library_path() -> Path | None:
    found = sorted(_HERE.glob("_C*.so"))
    return found[0] if found else None


def build_info() -> dict | None:
    """The build record embedded in the library (read from the file, without loading it)."""
    lib = library_path()
    if lib is None:
        return None
    try:
        data = lib.read_bytes()
    except OSError:
        return None
    i = data.find(b"GPTOSS_BUILD_INFO:")
    if i < 0:
        return None
    j = data.find(b"\0", i)
    try:
        return json.loads(data[i + len(b"GPTOSS_BUILD_INFO:"):j].decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def _arch_covers(archs: list[str], major: int, minor: int) -> bool:
    """Does SASS for one of archs (e.g. "90a", "80") run on compute capability major.minor?"""
    for a in archs:
        num = int(a.rstrip("a"))
        amaj, amin = divmod(num, 10)
        if a.endswith("a"):
            if (amaj, amin) == (major, minor):
                return True
        elif amaj == major and amin <= minor:
            return True
    return False


def load(strict: bool = True) -> bool:
    """Load the library once. Returns whether the kernels are usable. Raises ExtensionError on a
    version or architecture mismatch (when strict)."""
    if _state["tried"]:
        return _state["loaded"]
    _state["tried"] = True
    if os.environ.get("GPTOSS_EXT_DISABLE") == "1":
        _state["error"] = "disabled by GPTOSS_EXT_DISABLE=1"
        return False
    lib = library_path()
    if lib is None:
        _state["error"] = "not built: no gptoss_ext/_C.so (install with nvcc available to build it)"
        return False
    info = build_info() or {}
    _state["info"] = info
    built_torch = info.get("torch")
    if built_torch != torch.__version__:
        _state["error"] = f"built against torch {built_torch}, running torch {torch.__version__}"
        if strict:
            raise ExtensionError(f"gptoss_ext kernels were {_state['error']}: {REBUILD}")
        return False
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        archs = info.get("archs", [])
        ptx_ok = any(int(p) <= major * 10 + minor for p in info.get("ptx", []) if p.isdigit())
        if not (_arch_covers(archs, major, minor) or ptx_ok):
            _state["error"] = (f"GPU {torch.cuda.get_device_name()} is sm_{major}{minor}, kernels were built "
                               f"for {', '.join('sm_' + a for a in archs) or 'no architecture'}")
            if strict:
                raise ExtensionError(f"gptoss_ext: {_state['error']}: set TORCH_CUDA_ARCH_LIST and {REBUILD}")
            return False
    try:
        torch.ops.load_library(str(lib))
    except OSError as e:
        _state["error"] = f"cannot load {lib.name}: {e}"
        if strict:
            raise ExtensionError(f"gptoss_ext: {_state['error']}: {REBUILD}") from None
        return False
    _state["loaded"] = True
    _state["error"] = None
    return True


def available() -> bool:
    """Kernels loaded and a CUDA device present."""
    return load() and torch.cuda.is_available()


def load_error() -> str | None:
    load(strict=False)
    return _state["error"]


def load_at_import() -> None:
    """Called by `import gptoss_ext`: raise a mismatch now, except while `python -m gptoss_ext`
    is starting (sys.argv[0] == "-m"), where the CLI reports it as one line instead."""
    import sys

    try:
        load(strict=True)
    except ExtensionError as e:
        if sys.argv and sys.argv[0] == "-m":
            _state["deferred"] = e
        else:
            raise


def raise_deferred() -> None:
    e = _state.pop("deferred", None)
    if e is not None:
        raise e
