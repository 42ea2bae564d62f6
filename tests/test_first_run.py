"""The first five minutes of a new user: the README's commands on a fresh machine with no network,
no tokenizer variable and an empty home folder; every known condition reported as one line that
names the flag or the condition, never a traceback."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text()

# Put on PYTHONPATH of the commands run here: any attempt to open a network connection fails loudly.
NO_NETWORK = '''
import socket
def _refuse(*args, **kwargs):
    raise RuntimeError("gptoss-ext test: a network connection was attempted")
socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.create_connection = _refuse
'''


@pytest.fixture
def fresh_env(tmp_path):
    """No tokenizer variable, an empty home and tiktoken cache, no network, CPU only."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_NETWORK)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPTOSS_", "TIKTOKEN", "HF_"))}
    env.update(HOME=str(home), TIKTOKEN_CACHE_DIR=str(home / "tiktoken"), XDG_CACHE_HOME=str(home / ".cache"),
               PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]), CUDA_VISIBLE_DEVICES="")
    return env


def run(args, env=None, stdin=None, cwd=ROOT):
    return subprocess.run(args, capture_output=True, text=True, env=env, input=stdin, cwd=cwd, timeout=600)


def readme_first_command() -> str:
    """The part of the README's first set-up command after the installs: its `generate`."""
    block = re.search(r"## Set-up.*?```bash\n(.*?)\n```", README, re.S).group(1)
    return block.split("&&")[-1].strip()


def test_readme_first_command_runs_fresh_and_offline(fresh_env):
    cmd = readme_first_command()
    assert cmd.startswith("python3 -m gptoss_ext generate")
    r = run(["bash", "-c", cmd.replace("python3", sys.executable, 1)], fresh_env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "Traceback" not in r.stderr
    assert "NumPy" not in r.stderr                       # no warning from torch about a missing numpy
    assert "built-in random" in r.stderr and "stopped after --max-new-tokens" in r.stderr


def test_readme_chat_example_finishes_and_shows_what_was_generated(fresh_env):
    line = next(ln for ln in README.splitlines() if "chat --message" in ln).split("#")[0].strip()
    r = run(line.replace("python3", sys.executable, 1).split(), fresh_env)   # no shell quoting in it but the message
    if r.returncode != 0:                                                      # (the README quotes the message)
        r = run(["bash", "-c", line.replace("python3", sys.executable, 1)], fresh_env)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    # the random model writes no final channel: the reply is shown raw, with why it ended
    assert "[no final answer: generation stopped at the token limit (--max-new-tokens 64)" in r.stderr
    assert "what was generated, raw" in r.stderr and r.stdout.strip()


def readme_commands() -> list[str]:
    """Every `python3 -m gptoss_ext ...` line of the README that runs on any CPU machine as written
    (not those that name a downloaded checkpoint, a tools file, write 13 GB, need a GPU, or start a
    server that runs until stopped: tests/test_server.py starts and stops `serve`)."""
    out = []
    for ln in README.splitlines():
        ln = ln.split("  #")[0].strip()
        if "python3 -m gptoss_ext" not in ln or ln.startswith("python3 -m pip"):
            continue
        if any(s in ln for s in ("--model", "tools.json", " bench", "make-checkpoint --preset gpt-oss", "&&",
                                 " serve")):
            continue
        out.append(ln)
    return out


@pytest.mark.parametrize("line", readme_commands())
def test_readme_examples_run_as_written(line, fresh_env, tmp_path):
    r = run(["bash", "-c", line.replace("python3", sys.executable)], fresh_env, stdin="", cwd=tmp_path)
    assert r.returncode == 0, f"{line}\n{r.stderr}"
    assert "Traceback" not in r.stderr


def one_line_error(r, *needles):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


def cli(*args, env=None, stdin=None):
    return run([sys.executable, "-m", "gptoss_ext", *args], env, stdin)


@pytest.mark.parametrize("args,needles", [
    (["generate", "x", "--stop", "abc"], ["argument --stop", "'abc' is neither a token id"]),
    (["generate", "x", "--stop", "999999999"], ["argument --stop", "outside the vocabulary"]),
    (["generate", "x", "--device", "tpu"], ["--device tpu", "use auto, cpu, cuda or cuda:N"]),
    (["generate", "x", "--device", "cuda:7"], ["--device cuda:7"]),
    (["make-checkpoint", "--preset", "tiny", "--experts", "bf16", "--out", "/tmp/x"], ["--experts bf16 needs --layout hf"]),
])
def test_cli_errors_name_the_flag(args, needles, fresh_env):
    one_line_error(cli(*args, env=fresh_env), *needles)


def test_stop_by_name_is_accepted(fresh_env):
    r = cli("generate", "x", "--stop", "return", "<|call|>", "--max-new-tokens", "2", "--device", "cpu", env=fresh_env)
    assert r.returncode == 0, r.stderr


def test_bench_without_a_gpu_says_so(fresh_env):
    one_line_error(cli("bench", env=fresh_env), "needs a GPU")


def test_make_checkpoint_into_a_nonempty_folder_names_the_flag(tmp_path, fresh_env):
    (tmp_path / "keep").write_text("x")
    one_line_error(cli("make-checkpoint", "--preset", "tiny", "--out", str(tmp_path), env=fresh_env),
                   f"--out {tmp_path} exists and is not empty", "--overwrite")


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    from gptoss_ext import make_checkpoint

    root = tmp_path_factory.mktemp("ck")
    return {layout: make_checkpoint("tiny", root / layout, layout=layout) for layout in ("original", "hf")}


def test_info_on_a_truncated_checkpoint_fails_naming_the_file(tiny_ckpts, tmp_path, fresh_env):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpts["original"], bad)
    shard = sorted(bad.glob("*.safetensors"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1000)
    one_line_error(cli("info", "--model", str(bad), env=fresh_env), "truncated", shard.name)
    r = cli("info", "--model", str(tiny_ckpts["original"]), "--json", env=fresh_env)
    assert r.returncode == 0 and json.loads(r.stdout)["checkpoint"]["checked"]


def test_a_config_of_the_other_layout_is_named(tiny_ckpts, tmp_path, fresh_env):
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_ckpts["original"], mixed)
    shutil.copy(tiny_ckpts["hf"] / "config.json", mixed / "config.json")
    r = cli("generate", "x", "--model", str(mixed), "--device", "cpu", env=fresh_env)
    one_line_error(r, "config.json is a Hugging Face layout config", "named as in the OpenAI original/ layout")
    assert "missing tensor" not in r.stderr


def test_generation_that_reaches_the_context_limit_says_so(monkeypatch, capsys):
    """A model whose context holds 16 positions: a 10-token prompt stops after 6 tokens, and says why."""
    from gptoss_ext import __main__ as main_mod, random_model
    from gptoss_ext.config import get_preset

    short = get_preset("tiny").replace(initial_context_length=8, rope_scaling_factor=2.0)
    model = random_model(short, seed=0)
    monkeypatch.setattr(main_mod, "load_or_embedded", lambda a: model)
    rc = main_mod.main(["generate", "one two three four five six seven eight nine ten", "--stop",
                        "--max-new-tokens", "64", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 0 and "stopped at the context limit (16 tokens)" in err


def test_example_with_a_missing_checkpoint_is_one_line(fresh_env, tmp_path):
    for script in ("quickstart.py", "tool_calling.py"):
        r = run([sys.executable, str(ROOT / "python" / script), "--model", str(tmp_path / "none")], fresh_env)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("error: checkpoint folder not found")


def test_load_model_and_the_cli_share_the_auto_device():
    import inspect

    import torch

    from gptoss_ext import load_model
    from gptoss_ext.checkpoint import resolve_device

    assert inspect.signature(load_model).parameters["device"].default == "auto"
    want = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == want
    with pytest.raises(ValueError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
