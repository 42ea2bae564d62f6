"""Where a decode step and a prefill of the 20b shapes spend GPU time: kernel times from the torch
profiler (3 eager decode steps at 2k context, batch 1; one 2048-token prefill). Random weights
drawn on the GPU. Usage: python bench/profile_decode.py [preset]"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

import gptoss_ext as g
from gptoss_ext.generate import decode_runner

preset = sys.argv[1] if len(sys.argv) > 1 else "gpt-oss-20b"
m = g.random_model(preset, device="cuda", init_device="cuda")
prompt = torch.randint(0, 200000, (2048,))
r = decode_runner(m, 1, 3000, use_graph=False)
m.prefill([prompt], r.cache)
r.begin(r.cache.lengths[:1])
tok = torch.zeros(1, dtype=torch.long, device="cuda")
for _ in range(3):
    r.step(tok)
torch.cuda.synchronize()
for name, fn in (("decode step x3", lambda: [r.step(tok) for _ in range(3)]),
                 ("prefill 2048", lambda: (r.cache.reset(), m.prefill([prompt], r.cache)))):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"== {name}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
