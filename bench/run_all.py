"""Run the benchmarks on the GPU: measure the ceilings first, then every benchmark, and write
results (JSON, markdown, PNG) into --out. Prints the markdown table last.

    python bench/run_all.py --out results/ [--only ops]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import device_info, measure_ceilings, write_results  # noqa: E402

BENCHES = {
    "ops": "ops_bench",
    "moe": "moe_bench",
    "attn": "attn_bench",
}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--only", nargs="*", choices=list(BENCHES), help="benchmarks to run (default: all)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks need a CUDA GPU", file=sys.stderr)
        return 2
    import gptoss_ext  # noqa: F401  (loads the kernels, checks the build)

    info = device_info()
    ceilings = measure_ceilings()
    print(f"{info['device']}: copy {ceilings['copy_tbps']:.2f} TB/s, bf16 matmul {ceilings['matmul_bf16_tflops']:.0f} TFLOP/s",
          flush=True)
    rows = []
    for name in args.only or BENCHES:
        mod = __import__(BENCHES[name])
        rows += mod.run(info["l2_bytes"])
    text = write_results(Path(args.out), rows, ceilings, info, "bench")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
