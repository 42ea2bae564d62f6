"""`python -m gptoss_ext chat`: an interactive (or one-shot) harmony chat with streaming output,
reasoning on request, and function tools whose results the user types in."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

MAX_TOOL_ROUNDS = 8


from .cli_common import (BUILT_IN_MODEL_TOKENS, REAL_MODEL_CHAT_TOKENS, UsageError, add_model_args, add_sampling_args,
                         load_or_embedded)


def add_parser(sub) -> None:
    c = sub.add_parser("chat", help="chat in the harmony format (interactive, or --message for one shot)")
    c.add_argument("--message", help="one user message: answer it and exit")
    c.add_argument("--system", help="instructions (rendered into the developer message)")
    c.add_argument("--reasoning-effort", choices=["low", "medium", "high"], default="medium")
    c.add_argument("--show-reasoning", action="store_true", help="print the analysis channel to stderr")
    c.add_argument("--tools", help="JSON file with OpenAI function tools (a list, or {\"tools\": [...]})")
    c.add_argument("--date", help="current date for the system message (e.g. 2025-08-05)")
    add_model_args(c)
    add_sampling_args(c, max_new_tokens_help=f"a reply's token limit (default {REAL_MODEL_CHAT_TOKENS} with --model, "
                                             f"{BUILT_IN_MODEL_TOKENS} for the built-in random model)")
    c.set_defaults(fn=cmd_chat)


def load_tools(path: str) -> list:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"--tools {path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--tools {path}: not valid JSON ({e})") from None
    if isinstance(data, dict) and "tools" in data:
        data = data["tools"]
    if not isinstance(data, list):
        raise ValueError(f"--tools {path}: expected a list of function tools")
    from .harmony import _normalize_tools

    _normalize_tools(data)  # validates, raising a message that names the bad tool
    return data


def stop_reason(result, max_new: int) -> str:
    """Why a reply ended, in the CLI's words."""
    if result.stop == "length":
        return f"generation stopped at the token limit (--max-new-tokens {max_new})"
    if result.stop in ("return", "call"):
        return f"the model ended its turn (<|{result.stop}|>)"
    return f"generation stopped ({result.stop})"


def _read_line(prompt: str) -> str | None:
    if sys.stdin.isatty():
        print(prompt, end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    if not line:
        return None
    return line.rstrip("\n")


def cmd_chat(args) -> int:
    from . import harmony
    from .generate import check_sampling

    check_sampling(args.temperature, args.top_p, args.top_k)
    tools = load_tools(args.tools) if args.tools else None
    from . import tokenizer as tok

    tok.get_tokenizer()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("chat reads its messages from one terminal, which torchrun's ranks do not share: "
                         "use generate for tensor parallel")
    model = load_or_embedded(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    max_new = args.max_new_tokens
    if max_new is None:
        max_new = REAL_MODEL_CHAT_TOKENS if args.model else BUILT_IN_MODEL_TOKENS
    sampling = dict(max_new_tokens=max_new, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, seed=args.seed)

    def one_turn(user_text: str) -> bool:
        history.append({"role": "user", "content": user_text})
        for _ in range(MAX_TOOL_ROUNDS):
            result = None
            printed = thinking = False
            for ev in harmony.chat(model, history, tools=tools, reasoning_effort=args.reasoning_effort,
                                   current_date=args.date, stream=True, **sampling):
                if ev.kind == "reasoning" and args.show_reasoning:
                    if not thinking:
                        sys.stderr.write("[reasoning] ")
                    sys.stderr.write(ev.text)
                    sys.stderr.flush()
                    thinking = True
                    continue
                if thinking:
                    sys.stderr.write("\n")
                    thinking = False
                if ev.kind == "text":
                    sys.stdout.write(ev.text)
                    sys.stdout.flush()
                    printed = True
                elif ev.kind == "done":
                    result = ev.result
            if printed:
                sys.stdout.write("\n")
            history.append(result.as_assistant_message())
            if not result.tool_calls:
                if not result.text:
                    print(f"[no final answer: {stop_reason(result, max_new)} after {len(result.tokens)} tokens; "
                          "what was generated, raw:]", file=sys.stderr)
                    sys.stdout.write(tok.decode(result.tokens) + "\n")
                    sys.stdout.flush()
                return True
            for call in result.tool_calls:
                print(f"[tool call] {call.name}({call.raw})" + (f"  ({call.error})" if call.error else ""),
                      file=sys.stderr)
                answer = _read_line(f"result of {call.name}> ")
                if answer is None:
                    print("error: input ended while a tool result was expected", file=sys.stderr)
                    return False
                history.append({"role": "tool", "name": call.name, "content": answer})
        print(f"[stopped after {MAX_TOOL_ROUNDS} tool-call rounds]", file=sys.stderr)
        return True

    if args.message is not None:
        return 0 if one_turn(args.message) else 2
    while True:
        line = _read_line("you> ")
        if line is None:
            return 0
        if not line.strip():
            continue
        if not one_turn(line):
            return 2
