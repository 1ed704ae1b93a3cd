"""`xq chat` (in a pseudo-terminal and piped) and `xq generate --json` against docs/generate.schema.json."""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from schemas import assert_valid

from xqcli.cli import main
from xqcli.commands.chat import read_message

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]|\x1b[=>]|\r")


@pytest.fixture(scope="module")
def tiny_gguf():
    import assets

    return str(assets.tiny_gguf("llama"))


# ----------------------------------------------------------------------------------------- input


def lines(*items: str):
    it = iter(items)
    return lambda prompt: next(it, None)


def test_read_message_multi_line_forms():
    assert read_message(lines("hello"), "", "") == "hello"
    assert read_message(lines("one \\", "two\\", "three"), "", "") == "one \ntwo\nthree"
    assert read_message(lines('"""', "def f():", "    return 1", '"""'), "", "") == "def f():\n    return 1"
    assert read_message(lines('"""first', "second", 'third"""'), "", "") == "first\nsecond\nthird"
    assert read_message(lines('"""one line"""'), "", "") == "one line"
    assert read_message(lines('"""', "cut off by EOF"), "", "") == "cut off by EOF"
    assert read_message(lines("dangling \\"), "", "") == "dangling \n"
    assert read_message(lines(), "", "") is None


def test_choose_spec_options_then_bundle_defaults_then_xquant4():
    from xqcli.bundle.defaults import choose_spec
    from xqcli.cache.spec import CacheSpec

    assert choose_spec("kivi", bits=2, window=4) == CacheSpec.parse("kivi-2", window=4)
    assert choose_spec(None) == CacheSpec.parse("xquant-4")
    assert choose_spec(None, bits=2, window=4) == CacheSpec.parse("xquant-2", window=4)
    defaults = {"cache": "xquant-cl-3", "group_size": 64, "window": 16}
    assert choose_spec(None, cache_defaults=defaults) == CacheSpec.parse("xquant-cl-3", group_size=64, window=16)
    assert choose_spec(None, bits=2, window=4, cache_defaults=defaults) == CacheSpec.parse(
        "xquant-cl-2", group_size=64, window=4)
    assert choose_spec(None, bits=3, cache_defaults={"cache": "xquant-4+ch0"}).name == "xquant-3+ch0"
    assert choose_spec("kv", cache_defaults=defaults) == CacheSpec.parse("kv")  # --cache beats the bundle


# ------------------------------------------------------------------------------------ generate --json


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("args", [
    [],
    ["--cache", "xquant-cl-3", "--window", "4", "--temperature", "0.9", "--top-k", "20", "--top-p", "0.9",
     "--min-p", "0.02", "--repeat-penalty", "1.2", "--seed", "5"],
    ["--cache", "kivi", "--bits", "2", "--chat", "-s", "be brief", "--context", "1K"],
])
def test_generate_json_validates_against_the_schema(capsys, tiny_gguf, args):
    code, out, err = run(capsys, "generate", tiny_gguf, "-p", "the cat sat", "-n", "7", "--json", *args)
    assert code == 0, err
    obj = json.loads(out)
    assert_valid(obj, "generate")
    assert obj["generated_tokens"] == len(obj["tokens"]) == 7 and obj["finish"] == "max_tokens"
    assert obj["memory"]["context_tokens"] == obj["prompt_tokens"] + 6
    c = obj["memory"]["cache_bytes"]
    assert c["total"] == c["payload"] + c["scales"] + c["fp_window"] + c["workspace"] > 0


def test_generate_json_stop_and_plain_text(capsys, tiny_gguf):
    code, out, _ = run(capsys, "generate", tiny_gguf, "-p", "the cat", "-n", "12", "--json")
    full = json.loads(out)["text"]
    stop = full[4:6]
    code, out, _ = run(capsys, "generate", tiny_gguf, "-p", "the cat", "-n", "12", "--json", "--stop", stop)
    obj = json.loads(out)
    assert code == 0 and obj["finish"] == "stop"
    assert_valid(obj, "generate")
    assert obj["text"] == full[:full.index(stop)]
    code, out, err = run(capsys, "generate", tiny_gguf, "-p", "the cat", "-n", "12")
    assert code == 0 and out == full + "\n" and "12 generated tokens" in err


@pytest.mark.parametrize("context,tokens", [("1k", 1024), ("1K", 1024), ("1000", 1000), ("0.5k", 512)])
def test_generate_context_grammar(capsys, tiny_gguf, context, tokens):
    """--context reads sizes as every command does (xqcli.units: k = 1024; a plain number is exact)."""
    code, out, err = run(capsys, "generate", tiny_gguf, "-p", "the cat", "-n", "2", "--json", "--context", context)
    assert code == 0, err
    assert json.loads(out)["memory"]["capacity_tokens"] == tokens


def test_chat_context_grammar(capsys, monkeypatch, tiny_gguf):
    monkeypatch.setattr(sys, "stdin", io.StringIO("/exit\n"))
    code, _, err = run(capsys, "chat", tiny_gguf, "--cache", "kv", "--context", "1k")
    assert code == 0 and "context 1,024" in err, err


@pytest.mark.parametrize("args,code,needle", [
    (["--top-p", "1.5"], 2, "top-p must be in (0, 1] (got 1.5)"),
    (["--temperature", "-1"], 2, "temperature must be >= 0"),
    (["--min-p", "1"], 2, "min-p"),
    (["--top-k", "-3"], 2, "top-k"),
    (["--repeat-penalty", "0"], 2, "repeat penalty"),
    (["-n", "0"], 2, "max tokens must be >= 1"),
    (["--context", "big"], 2, "--context: cannot read 'big'"),
    (["--cache", "xquant-5"], 2, "bits must be one of"),
    (["--system", "x"], 2, "--system needs --chat"),
    (["--context", "3"], 7, "leaves no room to answer"),
])
def test_generate_exit_codes(capsys, tiny_gguf, args, code, needle):
    got, out, err = run(capsys, "generate", tiny_gguf, "-p", "the cat sat", *args)
    assert got == code and out == ""
    lines_ = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines_) == 1 and lines_[0].startswith("error:") and needle in lines_[0], err


# ------------------------------------------------------------------------------ chat, piped (plain)


def test_chat_plain_mode(capsys, monkeypatch, tmp_path, tiny_gguf):
    """stdout not a terminal: plain answers, no prompts, /stats and /mem as plain lines; errors don't end it."""
    session = tmp_path / "s.safetensors"
    script = "\n".join([
        "the cat \\", "sat on", "/stats", "/mem", "/set top_p 2", "/set temperature 0.5", "/set temperature 0",
        "/frobnicate", '"""', "a block", "of two lines", '"""', "/system talk like a pirate", f"/save {session}",
        "/load /nonexistent.safetensors", "/exit", "never read",
    ]) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    code, out, err = run(capsys, "chat", tiny_gguf, "--cache", "xquant-4", "--window", "4", "--temperature", "0",
                         "-n", "5", "--context", "512")
    assert code == 0, err
    assert ">>>" not in out and "\x1b[" not in out
    assert re.search(r"^prompt: \d+ tokens prefilled, 0 reused from the cache$", out, re.MULTILINE)
    assert re.search(r"^generated: 5 tokens, finish max_tokens$", out, re.MULTILINE)
    assert re.search(r"^per token past the window: [\d,]+ B/token \(payload\+scales\) vs fp16 KV [\d,]+ B/token: "
                     r"ratio [\d.]+x$", out, re.MULTILINE)
    assert "error: top-p must be in (0, 1] (got 2.0)" in err and "temperature=0.5" in err
    assert "error: unknown command /frobnicate" in err and "/nonexistent.safetensors does not exist" in err
    assert "saved" in err and session.is_file()
    from safetensors import safe_open

    with safe_open(str(session), "pt") as f:
        meta = json.loads(f.metadata()["session"])
    msgs = meta["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[0]["content"] == "talk like a pirate"
    assert msgs[1]["content"] == "the cat \nsat on" and msgs[3]["content"] == "a block\nof two lines"
    answers = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert all(a and a in out for a in answers)


# ------------------------------------------------------------------------------ chat in a terminal


class Pty:
    """A child process on a pseudo-terminal (stdin, stdout and stderr), read with select and timeouts."""

    def __init__(self, args: list[str], cols: int = 160, rows: int = 50) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = dict(os.environ, TERM="xterm-256color", COLUMNS=str(cols), LINES=str(rows))
        env.pop("NO_COLOR", None)
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT,
                                     close_fds=True)
        os.close(slave)
        self.raw = b""
        self.mark = 0  # expect() searches the transcript from here

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw.decode("utf-8", "replace"))

    def _pump(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.raw += data
        return bool(data)

    def expect(self, pattern: str, timeout: float) -> re.Match:
        rx, end = re.compile(pattern), time.monotonic() + timeout
        while True:
            m = rx.search(self.text, self.mark)
            if m:
                self.mark = m.end()
                return m
            if time.monotonic() > end or (not self._pump(0.2) and self.proc.poll() is not None):
                raise AssertionError(f"no {pattern!r} within {timeout} s; transcript tail:\n{self.text[-4000:]}")

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def turn(self, line: str, timeout: float = 600) -> str:
        """Send a line, wait for the next prompt, return what came in between."""
        self.send(line)
        start = self.mark
        self.expect(r"(?m)^>>> ", timeout)
        return self.text[start:self.mark]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        os.close(self.master)


def xq_chat(model: str, *args: str) -> Pty:
    return Pty([str(Path(sys.executable)), "-m", "xqcli", "chat", model, *args])


def test_chat_ctrl_c_stops_the_answer_not_the_session(tiny_gguf):
    p = xq_chat(tiny_gguf, "--cache", "kv", "--temperature", "0", "-n", "100000", "--context", "4096", "--no-mem")
    try:
        p.expect(r"(?m)^>>> ", 120)
        p.send("tell me a long story")
        p.expect(r"tell me a long story\n(?s:.){20}", 60)  # the answer is streaming
        p.proc.send_signal(signal.SIGINT)
        p.expect(r"\[interrupted\]", 30)
        p.expect(r"(?m)^>>> ", 30)
        out = p.turn("/stats", 30)
        assert "finish interrupted" in out
        out = p.turn("/set max_tokens 3", 30)
        out = p.turn("and then?", 120)
        assert re.search(r"3 tokens, [\d.]+ tok/s \| context", out)
        p.send("/exit")
        assert p.proc.wait(30) == 0
    finally:
        p.close()


def plan_row(model_dir, kind: str):
    from xqcli.config import ModelConfig
    from xqcli.readouts.plan import plan

    return plan(ModelConfig.from_file(Path(model_dir) / "config.json"), [kind], include_weights=False)[0]


@pytest.mark.slow
def test_chat_in_a_terminal_smollm2(smollm2_dir, smollm2, tmp_path):
    """Two turns, /stats, /mem, /save, /reset, /load, a third turn, /exit, with the live panel on."""
    from safetensors.torch import load_file

    from xqcli.engine import Engine, collect, load_session
    from xqcli.tokenizer import Tokenizer

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    row = plan_row(smollm2_dir, "xquant-4")
    p = xq_chat(str(smollm2_dir), "--cache", "xquant-4", "--temperature", "0", "--max-tokens", "12")
    try:
        banner = p.expect(r"(?m)^>>> ", 300)
        assert "cache xquant-4 (window 128)" in p.text[:banner.start()]
        first = p.turn("My name is Alice and my cat is called Tom.")
        # the live panel streamed on stderr, with xq plan's bytes per token and ratio for this kind
        assert re.search(rf"{row.bytes_per_token:,.0f} B/token past the window: {row.ratio:.2f}x", first)
        assert re.search(r"context\s+\d+ tokens \([\d,]+ of 4,096 left\)", first)
        assert "fp window" in first and "CL workspace" in first and "decode" in first
        second = p.turn("What is the name of my cat?")
        assert re.search(r"12 tokens, [\d.]+ tok/s \| context \d+", second)
        stats = p.turn("/stats")
        m = re.search(r"prompt\s+(\d+) tokens prefilled, (\d+) reused from the cache", stats)
        assert m and int(m.group(2)) > 0  # the second turn reused the first turn's cache
        assert re.search(r"generated\s+12 tokens, finish max_tokens", stats)
        mem = p.turn("/mem")
        m = re.search(r"([\d,]+) B/token \(payload\+scales\) vs fp16 KV ([\d,]+) B/token: ratio ([\d.]+)x", mem)
        assert m, mem
        assert int(m.group(1).replace(",", "")) == row.bytes_per_token
        assert int(m.group(2).replace(",", "")) == 30 * 2 * 192 * 2 and m.group(3) == f"{row.ratio:.2f}"
        held = int(re.search(r"context\s+(\d+) tokens held", mem).group(1))
        assert f"saved {held} tokens and 4 messages" in p.turn(f"/save {a}")
        assert "conversation cleared" in p.turn("/reset")
        assert f"loaded {held} tokens and 4 messages" in p.turn(f"/load {a}")
        p.turn(f"/save {b}")  # what the loaded session holds, written back out
        third = p.turn("What is my name?")
        stats = p.turn("/stats")
        assert re.search(rf"prompt\s+\d+ tokens prefilled, {held} reused from the cache", stats)  # continued
        p.send("/exit")
        assert p.proc.wait(60) == 0
    finally:
        p.close()
    # the reloaded cache holds exactly the saved ids and data
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys() and all((ta[k] == tb[k]).all() for k in ta)
    assert len(ta["ids"]) == held
    # the third answer is the continuation of the loaded conversation: the library gives the same text
    tok = Tokenizer.from_folder(smollm2_dir)
    e = Engine(smollm2, tok, "xquant-4", sampling=None)
    meta = load_session(a, e, str(smollm2_dir))
    assert meta["messages"][0] == {"role": "user", "content": "My name is Alice and my cat is called Tom."}
    answer = collect(e.chat_turn(meta["messages"] + [{"role": "user", "content": "What is my name?"}],
                                 temperature=0, max_tokens=12))[0]["text"]
    assert answer.splitlines()[0] in third
