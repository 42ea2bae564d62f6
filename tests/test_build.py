"""The compiled library (where this machine built one): its embedded build record, and that it uses
the shared libstdc++ of torch's process (a private static copy crashes on error messages)."""

import shutil
import subprocess

import pytest
import torch

from gptoss_ext import _extension, info

LIB = _extension.library_path()
needs_lib = pytest.mark.skipif(LIB is None, reason="the CUDA extension is not built on this machine")


@needs_lib
def test_build_record_matches_running_torch():
    b = _extension.build_info()
    assert b is not None and b["torch"] == torch.__version__
    assert b["archs"] and set(b["kernels"]) >= {"rms_norm", "rope", "attention", "moe_experts"}
    assert info()["kernels_built"]


@needs_lib
@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf is not installed")
def test_links_shared_libstdcxx():
    out = subprocess.run(["readelf", "-d", str(LIB)], capture_output=True, text=True).stdout
    assert "libstdc++.so" in out


def test_arch_coverage_rules():
    assert _extension._arch_covers(["90a"], 9, 0)
    assert not _extension._arch_covers(["90a"], 8, 0)
    assert _extension._arch_covers(["80"], 8, 9)
    assert not _extension._arch_covers(["80"], 9, 0)


def test_programmatic_launch_switch():
    from gptoss_ext import ops
    if not _extension.available():
        assert ops.set_pdl(True) is False          # nothing to switch without the extension
        return
    prev = ops.set_pdl(False)
    try:
        assert ops.set_pdl(True) is False and ops.set_pdl(True) is True
    finally:
        ops.set_pdl(prev)
