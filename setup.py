"""Install gptoss-ext; builds the CUDA kernels through CMakeLists.txt (the one list of sources/flags).

    pip install --no-build-isolation -e .     # torch must already be installed (it compiles against it)

Without a CUDA toolchain (or without torch at build time) this installs the pure-Python package,
which runs the reference ops, and says so once. Environment:
  CUDA_HOME            toolkit root (else /usr/local/cuda, else found through `nvcc -dryrun`,
                       which also sees through wrapper scripts)
  GPTOSS_CUDA_ARCHS    e.g. "90a;80+PTX" (default); TORCH_CUDA_ARCH_LIST is read too
  MAX_JOBS             parallel compile jobs (default: by cores and memory, ~3 GB per job)
  GPTOSS_EXT_SKIP_BUILD=1   install without compiling
  GPTOSS_PTXAS_VERBOSE=1    print registers/spills of every kernel
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _say(msg: str) -> None:
    print(f"gptoss-ext: {msg}", file=sys.stderr, flush=True)


def find_cuda_home() -> Path | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        v = os.environ.get(var)
        if v and (Path(v) / "bin" / "nvcc").is_file():
            return Path(v)
    if Path("/usr/local/cuda/bin/nvcc").is_file():
        return Path("/usr/local/cuda")
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return None
    # `nvcc` may be a wrapper script: ask nvcc itself where its toolkit is (the TOP= line of -dryrun).
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "probe.cu"
        src.write_text("")
        try:
            out = subprocess.run([nvcc, "-dryrun", "-c", str(src), "-o", str(Path(d) / "probe.o")],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
    if m:
        top = Path(m.group(1).strip()).resolve()
        if (top / "bin" / "nvcc").is_file():
            return top
    return Path(nvcc).resolve().parent.parent


def _tool(name: str) -> str | None:
    """cmake / ninja from PATH or from their PyPI packages."""
    path = shutil.which(name)
    if path:
        return path
    try:
        mod = __import__(name)
        p = Path(getattr(mod, "BIN_DIR", getattr(mod, "CMAKE_BIN_DIR", ""))) / name
        return str(p) if p.is_file() else None
    except ImportError:
        return None


def _jobs() -> int:
    if os.environ.get("MAX_JOBS"):
        return max(1, int(os.environ["MAX_JOBS"]))
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        mem_gb = 8
    return max(1, min(cores, int(mem_gb // 3)))


class CMakeBuild(build_ext):
    def run(self):
        self._skip_reason = None
        if os.environ.get("GPTOSS_EXT_SKIP_BUILD") == "1":
            self._skip_reason = "GPTOSS_EXT_SKIP_BUILD=1"
        else:
            try:
                import torch  # noqa: F401
            except ImportError:
                self._skip_reason = ("torch is not importable by the build (install torch first and use "
                                     "`pip install --no-build-isolation`)")
            else:
                self.cuda_home = find_cuda_home()
                if self.cuda_home is None:
                    self._skip_reason = "no CUDA toolchain found (set CUDA_HOME or put nvcc on PATH)"
        if self._skip_reason:
            _say(f"{self._skip_reason}: installing the pure-Python package without CUDA kernels "
                 "(CPU reference ops only).")
            return
        super().run()

    def build_extension(self, ext):
        cmake, ninja = _tool("cmake"), _tool("ninja")
        if cmake is None:
            raise RuntimeError("gptoss-ext: building the CUDA kernels needs cmake >= 3.22 (pip install cmake), "
                               "or set GPTOSS_EXT_SKIP_BUILD=1 for a pure-Python install")
        # A fixed build folder in the source tree (not setuptools' temporary one, which an editable
        # install throws away): a reinstall recompiles only what changed. One folder per Python and
        # torch, so switching either never mixes object files.
        import torch

        build_dir = ROOT / "build" / f"cmake-py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}"
        build_dir.mkdir(parents=True, exist_ok=True)
        nvcc = self.cuda_home / "bin" / "nvcc"
        cfg = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DCUDAToolkit_ROOT={self.cuda_home}",
            f"-DGPTOSS_PTXAS_VERBOSE={'ON' if os.environ.get('GPTOSS_PTXAS_VERBOSE') == '1' else 'OFF'}",
        ]
        if ninja:
            cfg += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        jobs = _jobs()
        _say(f"building CUDA kernels with {nvcc} ({jobs} parallel jobs) in {build_dir}; a first build takes a few "
             "minutes (pip shows the compiler's progress with -v), a rebuild only recompiles what changed")
        subprocess.run(cfg, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--target", "gptoss_ext_C", "-j", str(jobs)], check=True)
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(build_dir / "_C.so", target)
        _say(f"built {target.name}")


setup(
    name="gptoss-ext",
    version="0.1.0",
    description="gpt-oss inference on one NVIDIA GPU with hand-written CUDA kernels (MXFP4 MoE, sink attention)",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["gptoss_ext", "gptoss_ext.*"]),
    package_data={"gptoss_ext": ["data/*.xz"]},
    # numpy: torch warns on every import without it
    install_requires=["torch>=2.4", "safetensors>=0.4", "tiktoken>=0.7", "numpy"],
    extras_require={"test": ["pytest>=7.3", "transformers>=4.55", "openai-harmony>=0.0.4", "fastapi>=0.110",
                             "uvicorn>=0.29", "openai>=1.40", "httpx>=0.27", "aiohttp>=3.9"],
                    "serve": ["fastapi>=0.110", "uvicorn>=0.29"],
                    "hf": ["transformers>=4.55"]},
    ext_modules=[Extension("gptoss_ext._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    entry_points={"console_scripts": ["gptoss-ext=gptoss_ext.__main__:main"]},
    zip_safe=False,
)
