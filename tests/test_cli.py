"""python -m gptoss_ext: smoke runs and bad input (one clear line, non-zero exit, no traceback)."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "gptoss_ext", *args], capture_output=True, text=True,
                          input=stdin, cwd=ROOT, timeout=300)


def test_generate_embedded_default(tokenizer_file):
    r = run("generate", "Hello", "--max-new-tokens", "4", "--seed", "0", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "built-in random 'tiny' model" in r.stderr and "tok/s" in r.stderr
    assert r.stdout.strip()


def test_generate_from_stdin_greedy_is_deterministic(tokenizer_file):
    a = run("generate", "-", "--max-new-tokens", "4", "--temperature", "0", "--device", "cpu", stdin="Hi there")
    b = run("generate", "-", "--max-new-tokens", "4", "--temperature", "0", "--device", "cpu", stdin="Hi there")
    assert a.returncode == 0 and a.stdout == b.stdout


def test_make_checkpoint_then_generate_and_info(tokenizer_file, tmp_path):
    out = tmp_path / "ck"
    r = run("make-checkpoint", "--preset", "tiny", "--layout", "hf", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    r = run("generate", "Hi", "--model", str(out), "--max-new-tokens", "3", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "loaded" in r.stderr and "hf layout" in r.stderr
    r = run("info", "--model", str(out), "--json")
    d = json.loads(r.stdout)
    assert d["checkpoint"]["layout"] == "hf" and d["model"]["params"] > 0 and d["model"]["kv_cache_bytes"] > 0


def test_info():
    r = run("info", "--preset", "gpt-oss-120b", "--context", "8192")
    assert r.returncode == 0
    assert "kernels_built" in r.stdout and "116.83B" in r.stdout and "kv cache bytes" in r.stdout


@pytest.mark.parametrize("args,match", [
    (["generate", "x", "--model", "/no/such/folder"], "checkpoint folder not found"),
    (["generate", "x", "--temperature", "-2"], "temperature"),
    (["generate", "x", "--top-p", "0"], "top_p"),
    (["generate", "x", "--max-new-tokens", "-3"], "max-new-tokens"),
    (["make-checkpoint", "--preset", "gpt-oss-7b", "--out", "/tmp/never"], "unknown preset"),
    (["info", "--preset", "nope"], "unknown preset"),
])
def test_bad_input_is_one_line(args, match, tokenizer_file):
    r = run(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert match in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error:")


def test_make_checkpoint_into_nonempty_folder(tmp_path):
    (tmp_path / "keep").write_text("x")
    r = run("make-checkpoint", "--preset", "tiny", "--out", str(tmp_path))
    assert r.returncode == 2 and "not empty" in r.stderr and "Traceback" not in r.stderr


def test_bf16_experts_need_hf_layout(tmp_path):
    r = run("make-checkpoint", "--preset", "tiny", "--experts", "bf16", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "hf" in r.stderr


def test_unknown_subcommand():
    r = run("fly")
    assert r.returncode == 2 and "invalid choice" in r.stderr


# ---- chat ------------------------------------------------------------------------------------

REPLIES = ["<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant to=functions.get_weather"
           "<|channel|>commentary <|constrain|>json<|message|>{\"location\": \"Paris\"}<|call|>",
           "<|channel|>final<|message|>It is 20 degrees in Paris.<|return|>",
           "<|channel|>final<|message|>You are welcome.<|return|>"]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Gets the weather.",
          "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}]


def run_chat_in_process(monkeypatch, capsys, replies, *args, stdin=""):
    """`python -m gptoss_ext chat ...` in this process with the model replaced by canned replies
    (everything else as the CLI runs it): (exit code, stdout, stderr)."""
    import io

    from gptoss_ext import __main__ as cli, cli_chat
    from replay import ReplayModel

    monkeypatch.setattr(cli_chat, "load_or_embedded", lambda a: ReplayModel(list(replies)))
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    rc = cli.main(["chat", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_chat_piped_multi_turn_with_tool_call(tokenizer_file, tmp_path, monkeypatch, capsys):
    (tmp_path / "t.json").write_text(json.dumps(TOOLS))
    rc, out, err = run_chat_in_process(monkeypatch, capsys, REPLIES, "--tools", str(tmp_path / "t.json"),
                                       "--show-reasoning", stdin='Weather in Paris?\n{"temp": 20}\nThanks!\n')
    assert rc == 0, err
    assert out == "It is 20 degrees in Paris.\nYou are welcome.\n"
    assert "[reasoning] Need the weather." in err
    assert '[tool call] get_weather({"location": "Paris"})' in err


def test_chat_one_shot_with_embedded_model(tokenizer_file):
    r = run("chat", "--message", "Hello", "--max-new-tokens", "4", "--device", "cpu", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert "built-in random" in r.stderr and "Traceback" not in r.stderr


def test_chat_tool_result_missing(tokenizer_file, monkeypatch, capsys):
    rc, out, err = run_chat_in_process(monkeypatch, capsys, REPLIES[:1], stdin="Weather?\n")
    assert rc == 2 and "tool result was expected" in err


@pytest.mark.parametrize("content,match", [("not json", "not valid JSON"), ('{"x": 1}', "expected a list"),
                                           ('[{"type": "function", "function": {}}]', "function name")])
def test_chat_bad_tools_file(tokenizer_file, tmp_path, content, match):
    (tmp_path / "t.json").write_text(content)
    r = run("chat", "--message", "hi", "--tools", str(tmp_path / "t.json"))
    assert r.returncode == 2 and match in r.stderr and "Traceback" not in r.stderr


def test_chat_bad_effort():
    r = run("chat", "--message", "hi", "--reasoning-effort", "max")
    assert r.returncode == 2 and "invalid choice" in r.stderr
