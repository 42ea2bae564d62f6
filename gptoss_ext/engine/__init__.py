"""The serving engine: continuous batching over a paged KV cache with chunked prefill and prefix reuse.

  block_manager  block pools (full and sliding-window layers), per-sequence block tables, prefix
                 reuse by hash with reference counts and LRU eviction
  scheduler      which tokens each step computes: every running sequence's next token plus prefill
                 chunks within a token budget; preemption when blocks run out
  cache          the paged KV cache tensors
  engine         the loop: requests in, steps through the model, tokens out to each request
"""

from .block_manager import BlockManager, BlockPool, NoFreeBlocks
from .engine import Engine, EngineStepError, RequestHandle
from .scheduler import Request, SamplingParams, Scheduler, StepPlan

__all__ = ["BlockManager", "BlockPool", "Engine", "EngineStepError", "NoFreeBlocks", "Request", "RequestHandle",
           "SamplingParams", "Scheduler", "StepPlan"]
