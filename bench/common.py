"""Benchmark harness: CUDA-event timing with warm-up, median and spread, inputs rotated beyond L2,
the device's measured ceilings, and result rows written as JSON + markdown (+ PNG)."""

from __future__ import annotations

import json
import math
import platform
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class Row:
    bench: str                 # e.g. "add_rms_norm"
    case: str                  # e.g. "T=4096 H=2880"
    impl: str                  # "gptoss_ext" or a peer's name
    ms: float                  # median
    p10_ms: float
    p90_ms: float
    bytes: float = 0.0         # fewest bytes the op must move
    flops: float = 0.0
    launches: int | None = None
    timing: str = "graph"      # "graph" (CUDA-graph replay) or "eager" (Python launches included)
    target: str = ""           # what the issue asks of this row
    extra: dict = field(default_factory=dict)

    def tbps(self) -> float:
        return self.bytes / (self.ms * 1e-3) / 1e12 if self.ms > 0 else 0.0

    def tflops(self) -> float:
        return self.flops / (self.ms * 1e-3) / 1e12 if self.ms > 0 else 0.0


def device_info() -> dict:
    p = torch.cuda.get_device_properties(0)
    return {"device": p.name, "sm_count": p.multi_processor_count, "l2_bytes": p.L2_cache_size,
            "memory_bytes": p.total_memory, "capability": f"{p.major}.{p.minor}", "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version()}


def time_cuda(fn, n_inputs: int = 1, warmup: int = 10, groups: int = 30, target_group_ms: float = 1.0,
              graph: bool = True) -> tuple[float, float, float, str]:
    """Median, p10 and p90 of the time of one fn(i) call (ms), and how it was timed.
    fn(i) runs on input set i % n_inputs. Calls are timed in groups long enough (~target_group_ms)
    that event overhead vanishes. With graph=True a group is captured once in a CUDA graph and
    replayed, so the time is the GPU's, not Python's launch overhead (as in graph-captured decode);
    an fn that cannot be captured is timed eagerly and reported as such."""
    for i in range(warmup):
        fn(i % n_inputs)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for i in range(5):
        fn(i % n_inputs)
    e.record()
    torch.cuda.synchronize()
    est = max(s.elapsed_time(e) / 5, 1e-4)
    per_group = max(1, min(1000, int(target_group_ms / est)))
    run_group, mode = None, "eager"
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn(0)
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(g):
                for k in range(per_group):
                    fn(k % n_inputs)
            g.replay()
            torch.cuda.synchronize()
            run_group, mode = g.replay, "graph"
        except Exception:
            torch.cuda.synchronize()
            run_group = None
    if run_group is None:
        def run_group():
            for k in range(per_group):
                fn(k % n_inputs)
    times = []
    for _ in range(groups):
        s.record()
        run_group()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / per_group)
    times.sort()
    return statistics.median(times), times[len(times) // 10], times[(9 * len(times)) // 10], mode


def rotation_count(bytes_per_set: int, l2_bytes: int, cap: int = 64) -> int:
    """How many input sets to rotate through so together they are 3x the L2."""
    return max(2, min(cap, math.ceil(3 * l2_bytes / max(1, bytes_per_set))))


def count_launches(fn) -> int | None:
    """CUDA kernels launched by one fn() call (torch profiler), or None where it is unavailable."""
    try:
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA)
    except Exception:
        return None


def measure_ceilings() -> dict:
    """Device-to-device copy bandwidth (bytes read + written) and a large bf16 matmul rate."""
    from gptoss_ext.benchmark import copy_bandwidth

    copy_tbps = copy_bandwidth() / 1e12
    m = 8192
    x = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    ms, _, _, _ = time_cuda(lambda i: x @ y, warmup=3, groups=10, target_group_ms=10, graph=False)
    mm_tflops = 2 * m ** 3 / (ms * 1e-3) / 1e12
    del x, y
    torch.cuda.empty_cache()
    return {"copy_tbps": copy_tbps, "matmul_bf16_tflops": mm_tflops}


def write_results(out: Path, rows: list[Row], ceilings: dict, info: dict, title: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    data = {"device": info, "ceilings": ceilings,
            "rows": [{**asdict(r), "tbps": r.tbps(), "tflops": r.tflops(),
                      "pct_copy_bw": 100 * r.tbps() / ceilings["copy_tbps"],
                      "pct_matmul": 100 * r.tflops() / ceilings["matmul_bf16_tflops"]} for r in rows]}
    (out / f"{title}.json").write_text(json.dumps(data, indent=2))
    md = [f"# {title}", "",
          f"{info['device']} ({info['sm_count']} SMs, L2 {info['l2_bytes'] / 1e6:.0f} MB), torch {info['torch']}, "
          f"CUDA {info['cuda']}. Ceilings measured in this run: copy {ceilings['copy_tbps']:.2f} TB/s "
          f"(read+write), bf16 matmul {ceilings['matmul_bf16_tflops']:.0f} TFLOP/s.", "",
          "| bench | case | impl | timing | median µs | p10–p90 µs | TB/s | % copy BW | TFLOP/s | % matmul | launches | target |",
          "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r, d in zip(rows, data["rows"]):
        md.append(f"| {r.bench} | {r.case} | {r.impl} | {r.timing} | {r.ms * 1e3:.1f} | {r.p10_ms * 1e3:.1f}–{r.p90_ms * 1e3:.1f} | "
                  f"{d['tbps']:.2f} | {d['pct_copy_bw']:.0f}% | {d['tflops']:.1f} | {d['pct_matmul']:.1f}% | "
                  f"{'' if r.launches is None else r.launches} | {r.target} |")
    text = "\n".join(md) + "\n"
    (out / f"{title}.md").write_text(text)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(10, 0.3 * len(rows) + 1.5))
        labels = [f"{r.bench} {r.case} [{r.impl}]" for r in rows]
        ax.barh(labels, [d["pct_copy_bw"] for d in data["rows"]])
        ax.set_xlabel("% of measured copy bandwidth")
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(out / f"{title}.png", dpi=80)
        plt.close(fig)
    except ImportError:
        pass
    return text
