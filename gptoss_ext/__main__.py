"""Command line: python -m gptoss_ext {generate, chat, make-checkpoint, info, bench}."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import cli_chat
from .cli_common import (BUILT_IN_MODEL_TOKENS, UsageError, add_model_args, add_parallel_args, add_sampling_args,
                         load_or_embedded, stop_token)


def cmd_generate(args) -> int:
    from . import tokenizer as tok
    from .generate import check_sampling

    check_sampling(args.temperature, args.top_p, args.top_k)
    max_new = BUILT_IN_MODEL_TOKENS if args.max_new_tokens is None else args.max_new_tokens
    if max_new < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {max_new}")
    tok.get_tokenizer()
    model = load_or_embedded(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    ids = tok.encode(prompt, allow_special=not args.no_special)
    if not ids:
        raise UsageError("the prompt is empty: give some text (or '-' to read it from stdin)")
    context = model.config.context_length
    if len(ids) >= context:
        raise UsageError(f"the prompt has {len(ids)} tokens; the model's context holds {context} (and one must be "
                         "left to generate)")
    stops = args.stop if args.stop is not None else [tok.RETURN, tok.CALL, tok.ENDOFTEXT]
    dec = tok.StreamDecoder()
    out = sys.stdout
    t0 = time.perf_counter()
    first = None
    n = 0
    last = None
    for token in model.generate(ids, max_new_tokens=max_new, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop_tokens=stops,
                                stream=True):
        if first is None:
            first = time.perf_counter() - t0
        n += 1
        last = token
        out.write(dec.push(token))
        out.flush()
    out.write(dec.flush() + "\n")
    dt = time.perf_counter() - t0
    if last in stops:
        why = f"stopped at {tok.special_tokens_by_id().get(last, f'token {last}')}"
    elif n >= max_new:
        why = f"stopped after --max-new-tokens {max_new}"
    else:
        why = f"stopped at the context limit ({context} tokens)"
    if n:
        rate = (n - 1) / (dt - first) if n > 1 and dt > first else float("nan")
        print(f"[{len(ids)} prompt tokens, {n} generated in {dt:.2f} s: first token after {first * 1000:.0f} ms, "
              f"then {rate:.1f} tok/s; {why}]", file=sys.stderr)
    else:
        print(f"[{len(ids)} prompt tokens, nothing generated: {why}]", file=sys.stderr)
    return 0


def cmd_make_checkpoint(args) -> int:
    from .config import format_bytes, get_preset
    from .synthetic import make_checkpoint

    get_preset(args.preset)
    if args.experts == "bf16" and args.layout != "hf":
        raise UsageError("--experts bf16 needs --layout hf (the original layout always stores MXFP4 experts)")
    t0 = time.perf_counter()
    try:
        path = make_checkpoint(args.preset, args.out, layout=args.layout, seed=args.seed,
                               quantized=args.experts == "mxfp4", shard_bytes=int(args.shard_gb * 1e9),
                               overwrite=args.overwrite)
    except FileExistsError:
        raise UsageError(f"--out {args.out} exists and is not empty: choose an empty folder, or add --overwrite to "
                         "replace what is there") from None
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"wrote {path} ({args.preset}, {args.layout} layout, {args.experts} experts, seed {args.seed}): "
          f"{format_bytes(size)} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_info(args) -> int:
    import gptoss_ext as g
    from .config import format_bytes, format_count, get_preset

    d = {"install": g.info()}
    config = None
    if args.model:
        ci = g.check_checkpoint(args.model)          # every file's header and size, every tensor's shape
        config = ci.config
        d["checkpoint"] = {"path": str(ci.path), "layout": ci.layout,
                           "experts": "mxfp4" if ci.quantized else "bf16",
                           "files": len(ci.files), "bytes_on_disk": sum(f.stat().st_size for f in ci.files),
                           "checked": "every tensor present, shapes and dtypes as the config says, no file truncated",
                           "tokenizer": ci.tokenizer_check or "no tokenizer.json in the folder (o200k_harmony is used)"}
    elif args.preset:
        config = get_preset(args.preset)
    if config is not None:
        s = config.summary(quantized=not args.model or d["checkpoint"]["experts"] == "mxfp4")
        d["model"] = {**s, "config": config.to_original_dict(),
                      "kv_cache_bytes": config.kv_cache_bytes(args.context, args.batch),
                      "kv_cache_for": {"context": args.context, "batch": args.batch},
                      "decode_bytes_per_step": config.decode_bytes_per_step(args.context, args.batch)}
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    for k, v in d["install"].items():
        print(f"{k:22s} {v}")
    if "checkpoint" in d:
        for k, v in d["checkpoint"].items():
            print(f"{k:22s} {format_bytes(v) if k == 'bytes_on_disk' else v}")
    if "model" in d:
        m = d["model"]
        print(f"{'params':22s} {format_count(m['params'])} ({format_count(m['active_params'])} active per token)")
        print(f"{'weight bytes':22s} {format_bytes(m['weight_bytes'])}")
        for k, v in m["weight_bytes_by_group"].items():
            print(f"{'  ' + k:22s} {format_bytes(v)}")
        print(f"{'kv cache bytes':22s} {format_bytes(m['kv_cache_bytes'])} "
              f"({args.context} tokens x batch {args.batch}, bf16)")
        print(f"{'decode bytes/step':22s} {format_bytes(m['decode_bytes_per_step'])}")
    return 0


def _report(res: dict, json_path: str | None, table) -> int:
    """A benchmark's results: JSON to --json if given, the markdown table to stdout."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(res, f, indent=2)
    print(table(res))
    return 0


def cmd_bench(args) -> int:
    import torch

    from . import benchmark, ops

    if not torch.cuda.is_available():
        raise UsageError("bench measures the CUDA kernels and needs a GPU; this machine has none "
                         "(generate and chat run on the CPU)")
    if not ops.kernels_available():
        from . import _extension
        raise UsageError(f"bench needs the CUDA kernels, which are not available ({_extension.load_error()}): "
                         "reinstall with `pip install --no-build-isolation -e .` on a machine with nvcc")
    from .cli_common import tensor_parallel

    tp, _ = tensor_parallel(args, torch.device("cuda"))   # several ranks (torchrun): a GPU each, all run this
    res = benchmark.run(preset=None if args.model else args.preset, model_dir=args.model, peers=not args.no_peers,
                        new_tokens=args.new_tokens, tp=tp)
    if tp is not None and tp.rank != 0:
        return 0
    return _report(res, args.json, benchmark.format_table)


def cmd_bench_serve(args) -> int:
    if args.input_len < 1 or args.output_len < 1 or args.num_requests < 1 or args.max_concurrency < 1:
        raise UsageError("--input-len, --output-len, --num-requests and --max-concurrency must be >= 1")
    if args.mixed < 0 or args.max_prefill_with_decodes < 0:
        raise UsageError("--mixed and --max-prefill-with-decodes must be >= 0")
    if args.base_url:                 # a running server, through HTTP
        try:
            import aiohttp
        except ImportError:
            raise UsageError("bench-serve --base-url needs aiohttp: pip install aiohttp") from None
        from .server import bench as http_bench

        try:
            res = http_bench.run(args.base_url, num_requests=args.num_requests, input_len=args.input_len,
                                 output_len=args.output_len, rate=args.request_rate, concurrency=args.max_concurrency,
                                 api_key=args.api_key, shared_prefix=args.shared_prefix)
        except aiohttp.ClientConnectionError as e:
            raise UsageError(f"--base-url {args.base_url}: cannot reach the server ({type(e).__name__}: {e})") from None
        return _report(res, args.json, http_bench.format_table)
    import gptoss_ext as g

    from .cli_common import device_arg, tensor_parallel

    tp, dev = tensor_parallel(args, device_arg(args.device))
    if args.model:
        model = g.load_model(args.model, device=dev, tp=tp)
        label = f"checkpoint {args.model}"
    else:
        try:
            model = g.random_model(args.preset, device=dev, init_device=dev if dev.type == "cuda" else None, tp=tp)
        except ValueError as e:
            raise UsageError(str(e)) from None
        label = f"preset {args.preset}, random weights"
    if tp is None:
        return _bench_serve(args, model, label)
    if tp.rank != 0:                      # rank 0 drives the engines; this rank runs their steps
        from .parallel import follow_engines

        follow_engines(model)
        return 0
    try:
        return _bench_serve(args, model, f"{label}, {tp.world} ranks (MoE split: {tp.moe})")
    finally:
        from .parallel import release_followers

        release_followers(model)


def _bench_serve(args, model, label: str) -> int:
    import torch

    from .engine import bench

    kwargs = dict(block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens,
                  max_prefill_with_decodes=args.max_prefill_with_decodes or None)
    if args.num_blocks:
        kwargs["num_blocks"] = args.num_blocks
    static = args.static_batch
    if model.tp is not None:
        kwargs["broadcast"] = True
        if static:
            print("[several ranks: the static generate() baseline is skipped (rank 0 alone drives the engine "
                  "here)]", file=sys.stderr)
            static = 0
    if args.mixed:
        from .engine import Engine

        ctx = model.config.context_length
        if args.input_len + 2 > ctx or args.mixed >= ctx:
            raise UsageError(f"--mixed {args.mixed} / --input-len {args.input_len}: each prompt must leave room to "
                             f"generate within the model's {ctx}-token context")
        with torch.inference_mode():
            # (no admission reserve: the decoders never end on their own, the long prompt must get in)
            r = bench.run_mixed(Engine(model, decode_reserve=0.0, **kwargs), num_decoding=args.num_requests,
                                input_len=args.input_len, long_len=args.mixed)
        res = {"model": label, "mixed": r, "engine_config": kwargs}
        return _report(res, args.json, bench.format_mixed)
    with torch.inference_mode():
        res = bench.run(model, num_requests=args.num_requests, input_len=args.input_len, output_len=args.output_len,
                        rate=args.request_rate, static_batch=static, engine_kwargs=kwargs,
                        shared_prefix=args.shared_prefix, label=label)
    return _report(res, args.json, bench.format_table)


def cmd_serve(args) -> int:
    import importlib.util
    import logging

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"serve needs fastapi and uvicorn ({', '.join(missing)} not installed): "
                         "pip install 'gptoss-ext[serve]'")
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port {args.port} is not a TCP port")
    if args.max_prefill_with_decodes < 0:
        raise UsageError("--max-prefill-with-decodes must be >= 0 (0: no cap)")
    for flag in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_stored_responses"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise UsageError("--gpu-memory-utilization must be in (0, 1]")
    model = load_or_embedded(args)
    if model.tp is not None and model.tp.rank != 0:   # rank 0 serves; the others run its engine's steps
        import signal

        from .parallel import follow_engines

        # Ctrl-C (torchrun passes it on to every rank) stops rank 0's server, which drains and then
        # releases this rank: stopping here first would strand rank 0 mid-collective
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        follow_engines(model)
        return 0
    name = args.served_model_name
    if not name and args.model:                  # gpt-oss-20b/original -> gpt-oss-20b
        parts = os.path.normpath(os.path.abspath(args.model)).split(os.sep)
        name = parts[-2] if parts[-1] == "original" and len(parts) > 1 else parts[-1]
    name = name or f"gpt-oss-{args.preset}-random"
    engine_args = dict(block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                       memory_fraction=args.gpu_memory_utilization,
                       max_prefill_with_decodes=args.max_prefill_with_decodes or None)
    if args.num_blocks:
        engine_args["num_blocks"] = args.num_blocks
    if model.tp is not None:
        engine_args["broadcast"] = True
    try:
        return _serve(model, name, args, engine_args)
    finally:
        if model.tp is not None:
            from .parallel import release_followers

            release_followers(model)


def _serve(model, name, args, engine_args) -> int:
    from .server import make_server

    try:
        server = make_server(model, host=args.host, port=args.port, model_name=name, api_key=args.api_key,
                             max_stored_responses=args.max_stored_responses, shutdown_timeout=args.shutdown_timeout,
                             log_level=args.log_level, **engine_args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    eng = server.config.app.state.ctx.runner.engine
    print(f"[serving '{name}' at http://{args.host}:{args.port}/v1 (OpenAI API: /chat/completions, /responses, "
          f"/completions, /models; /health, /metrics); context {eng.max_model_len} tokens, "
          f"{eng.blocks.full.num_blocks} KV blocks of {eng.block_size}; Ctrl-C stops]", file=sys.stderr, flush=True)
    try:
        server.run()
    except KeyboardInterrupt:          # uvicorn re-raises the SIGINT it handled, after its shutdown
        pass
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gptoss_ext", description="gpt-oss inference with CUDA kernels")
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="continue a prompt, streaming text to stdout")
    g.add_argument("prompt", help="prompt text ('-' reads stdin); special tokens like <|start|> are honoured")
    add_model_args(g)
    add_sampling_args(g)
    g.add_argument("--stop", nargs="*", type=stop_token, metavar="TOKEN",
                   help="stop tokens, by id or by name (default: <|return|> <|call|> <|endoftext|>; --stop with "
                        "nothing after it: none)")
    g.add_argument("--no-special", action="store_true", help="treat special-token text in the prompt as plain text")
    g.set_defaults(fn=cmd_generate)

    m = sub.add_parser("make-checkpoint", help="write a random checkpoint of a preset's shapes")
    m.add_argument("--preset", required=True)
    m.add_argument("--layout", choices=["original", "hf"], default="original")
    m.add_argument("--experts", choices=["mxfp4", "bf16"], default="mxfp4", help="bf16 needs --layout hf")
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--shard-gb", type=float, default=4.0)
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(fn=cmd_make_checkpoint)

    i = sub.add_parser("info", help="what is installed; with --model or --preset, the model's sizes")
    i.add_argument("--model", help="checkpoint folder (only headers and config are read)")
    i.add_argument("--preset")
    i.add_argument("--context", type=int, default=8192, help="context for the KV-cache size (default 8192)")
    i.add_argument("--batch", type=int, default=1)
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_info)

    b = sub.add_parser("bench", help="end-to-end speed on the GPU: prefill, decode (B=1 at 2k/8k, B=32), "
                                     "memory, the bandwidth floor, transformers as a peer")
    b.add_argument("--preset", default="gpt-oss-20b", help="model shapes (random weights drawn on the GPU)")
    b.add_argument("--model", help="benchmark this checkpoint folder instead")
    b.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per measurement")
    b.add_argument("--no-peers", action="store_true", help="skip the transformers peer")
    add_parallel_args(b)
    b.add_argument("--json", help="also write the results as JSON here")
    b.set_defaults(fn=cmd_bench)

    s = sub.add_parser("bench-serve", help="the serving engine under load (N requests at once or at a rate): "
                                           "output tok/s, TTFT, time per output token; static generate() beside it")
    s.add_argument("--preset", default="gpt-oss-20b", help="model shapes (random weights)")
    s.add_argument("--model", help="benchmark this checkpoint folder instead")
    s.add_argument("--device", default="auto")
    add_parallel_args(s)
    s.add_argument("--json", help="also write the results as JSON here")
    s.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s, Poisson (default: all at once)")
    s.add_argument("--base-url", help="drive a running server (`serve`) through HTTP at this /v1 URL instead")
    s.add_argument("--api-key", default=os.environ.get("GPTOSS_API_KEY"), help="with --base-url")
    s.add_argument("--max-concurrency", type=int, default=256, help="with --base-url: requests in flight at most")
    for flag, default, doc in (("num-requests", 512, ""), ("input-len", 1024, "prompt tokens"),
                               ("output-len", 1024, "tokens generated (stops ignored)"),
                               ("shared-prefix", 0, "tokens every prompt starts with (prefix reuse)"),
                               ("max-num-seqs", 256, "sequences a step"), ("max-num-batched-tokens", 8192,
                                                                           "tokens a step (chunked prefill budget)"),
                               ("block-size", 128, "KV block positions"),
                               ("num-blocks", 0, "KV blocks (0: from free GPU memory)"),
                               ("static-batch", 64, "batch of the static generate() run (0: skip it)"),
                               ("mixed", 0, "instead: a prompt of this many tokens arrives while --num-requests "
                                            "requests decode; their longest step while it is read vs the median"),
                               ("max-prefill-with-decodes", 0, "prefill tokens at most in a step that also decodes "
                                                               "(0: the whole --max-num-batched-tokens)")):
        s.add_argument(f"--{flag}", type=int, default=default, help=doc or None)
    s.set_defaults(fn=cmd_bench_serve)

    v = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat completions, responses, completions) "
                                     "on the serving engine")
    add_model_args(v)
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--api-key", default=os.environ.get("GPTOSS_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $GPTOSS_API_KEY, else none)")
    v.add_argument("--served-model-name", help="the model name clients send (default: the checkpoint folder's name)")
    v.add_argument("--max-model-len", type=int, default=None, help="context a request may use (default: the model's)")
    for flag, default, doc in (("max-num-seqs", 256, "sequences a step"),
                               ("max-num-batched-tokens", 8192, "tokens a step (the chunked-prefill budget)"),
                               ("block-size", 128, "KV block positions"),
                               ("num-blocks", 0, "KV blocks (0: from --gpu-memory-utilization)"),
                               ("max-prefill-with-decodes", 0, "prefill tokens at most in a step that also decodes "
                                                               "(0: the whole --max-num-batched-tokens)"),
                               ("max-stored-responses", 1024, "responses kept for previous_response_id")):
        v.add_argument(f"--{flag}", type=int, default=default, help=doc)
    v.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of the free GPU memory the KV cache takes (default 0.9)")
    v.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running requests get to finish on Ctrl-C before they are cancelled")
    v.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    v.set_defaults(fn=cmd_serve)

    cli_chat.add_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from . import _extension

        _extension.raise_deferred()
        return args.fn(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # one clear line, no traceback (GPTOSS_DEBUG=1 shows it)
        if os.environ.get("GPTOSS_DEBUG") == "1":
            raise
        known = ("UsageError", "CheckpointError", "TokenizerError", "ExtensionError", "ValueError", "HarmonyError",
                 "FileExistsError", "FileNotFoundError", "PermissionError", "OutOfMemoryError",
                 "NotImplementedError")
        kind = "" if type(e).__name__ in known else f"internal error ({type(e).__name__}): "
        print(f"error: {kind}{e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
