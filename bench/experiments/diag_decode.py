"""Diagnostic: decode-path logits against the whole-sequence forward on the small random model.

For a few prompts, 23 teacher-forced decode steps (model.decode, the kernels or the reference ops)
are compared with the logits of one forward over prompt + tokens, with each position's smallest
router gap (k-th minus (k+1)-th expert logit over the layers). Isolated spikes in the difference
at router gaps of ~0 are expert choices flipped by rounding, not kernel errors.

    python bench/experiments/diag_decode.py          # on a GPU machine
"""
import contextlib

import torch

import gptoss_ext as g

DEV = "cuda"


class Fp32Unembedding(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight32 = weight.float()

    def forward(self, x):
        return x.float() @ self.weight32.T


def router_gaps(model, tokens, first):
    gaps = []
    route = g.ops.moe_router

    def spy(logits, k):
        top = logits.float().topk(k + 1, dim=-1).values
        gaps.append(top[:, k - 1] - top[:, k])
        return route(logits, k)

    g.ops.moe_router = spy
    try:
        model(tokens)
    finally:
        g.ops.moe_router = route
    return torch.stack(gaps).min(0).values[first:-1]


def main():
    model = g.random_model("small", seed=3, device=DEV, dtype=torch.bfloat16)
    model.unembedding = Fp32Unembedding(model.unembedding.weight)
    for n in (5, 140, 40, 1):
        prompt = torch.randint(0, 200000, (n,), generator=torch.Generator().manual_seed(10 + n))
        seq = torch.randint(0, 200000, (24,), generator=torch.Generator().manual_seed(99 + n))
        full = torch.cat([prompt, seq]).to(DEV)
        with torch.no_grad():
            print(f"prompt {n}: router gaps", " ".join(f"{x:.3f}" for x in router_gaps(model, full, n - 1).tolist()))
            for mode in ("kernels", "reference"):
                with g.ops.reference_mode() if mode == "reference" else contextlib.nullcontext():
                    pre = model(full)[n - 1:-1].float()
                    cache = model.new_cache(256)
                    first = model(prompt.to(DEV), cache)[-1].float()
                    steps = []
                    for i in range(23):
                        pos = n + i
                        lg = model.decode(seq[i:i + 1].to(DEV), cache,
                                          torch.tensor([pos + 1], dtype=torch.int32, device=DEV),
                                          torch.tensor([pos], dtype=torch.int64, device=DEV))[0].float()
                        steps.append((lg - pre[i + 1]).abs().max().item())
                print(f"  {mode}: prefill last row max|d| {(first - pre[0]).abs().max().item():.4f}; decode steps",
                      " ".join(f"{s:.2f}" for s in steps))


if __name__ == "__main__":
    main()
