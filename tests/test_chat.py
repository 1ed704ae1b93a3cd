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
    ["--cache", "kivi", "--bits", "2", "--chat", "-s", "be brief", "--context", "0.5K"],
])
def test_generate_json_validates_against_the_schema(capsys, tiny_gguf, args):
    code, out, err = run(capsys, "generate", tiny_gguf, "-p", "the cat sat", "-n", "7", "--json", *args)
    assert code == 0, err
    obj = json.loads(out)
    assert_valid(obj, "generate")
    assert obj["generated_tokens"] == len(obj["tokens"]) == 7 and obj["finish"] == "max_tokens"
    m = obj["memory"]
    assert m["context_tokens"] == obj["prompt_tokens"] + 6
    left = {"context": m["capacity_tokens"] - m["context_tokens"],
            "trained length": m["trained_tokens"] - m["context_tokens"]}
    assert m["tokens_left"] == left[m["tokens_left_limit"]] == min(left.values())
    stored = m["cache_bytes"]["total"] - m["cache_bytes"]["workspace"]
    assert m["model_dtype"] == "float32" and m["kv_model_bytes"] == 2 * m["kv_fp16_bytes"]
    assert m["ratio_now"] == pytest.approx(m["kv_fp16_bytes"] / stored, rel=1e-3)
    word = "larger" if stored > m["kv_fp16_bytes"] else "smaller"
    assert f"x {word} than fp16 KV" in m["summary"] and f"KiB for {m['capacity_tokens']:,} tokens, " in m["summary"]
    c = obj["memory"]["cache_bytes"]
    assert c["total"] == c["payload"] + c["scales"] + c["fp_window"] + c["workspace"] > 0


def test_generate_json_stop_and_plain_text(capsys, tiny_gguf):
    code, first, _ = run(capsys, "generate", tiny_gguf, "-p", "the cat", "-n", "12", "--json")
    full = json.loads(first)["text"]
    stop = full[4:6]
    code, out, _ = run(capsys, "generate", tiny_gguf, "-p", "the cat", "-n", "12", "--json", "--stop", stop)
    obj = json.loads(out)
    assert code == 0 and obj["finish"] == "stop"
    assert_valid(obj, "generate")
    assert obj["text"] == full[:full.index(stop)]
    code, out, err = run(capsys, "generate", tiny_gguf, "-p", "the cat", "-n", "12")
    assert code == 0 and out == full + "\n" and "12 generated tokens" in err
    assert json.loads(first)["memory"]["summary"] in " ".join(err.split()), err  # the same words as --json


@pytest.mark.parametrize("context,tokens", [("1k", 1024), ("1K", 1024), ("1000", 1000), ("0.5k", 512)])
def test_generate_context_grammar(capsys, tiny_gguf, context, tokens):
    """--context reads sizes as every command does (xqcli.units: k = 1024; a plain number is exact). The tiny
    model was trained on 512 positions: longer contexts need --allow-long-context."""
    code, out, err = run(capsys, "generate", tiny_gguf, "-p", "the cat", "-n", "2", "--json", "--context", context,
                         "--allow-long-context")
    assert code == 0, err
    assert json.loads(out)["memory"]["capacity_tokens"] == tokens


def test_chat_context_grammar(capsys, monkeypatch, tiny_gguf):
    monkeypatch.setattr(sys, "stdin", io.StringIO("/exit\n"))
    code, _, err = run(capsys, "chat", tiny_gguf, "--cache", "kv", "--context", "1k", "--allow-long-context")
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
        "/load /nonexistent.safetensors", "/help", "/exit", "never read",
    ]) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    code, out, err = run(capsys, "chat", tiny_gguf, "--cache", "xquant-4", "--window", "4", "--temperature", "0",
                         "-n", "5", "--context", "512")
    assert code == 0, err
    assert ">>>" not in out and "\x1b[" not in out
    assert re.search(r"^prompt: \d+ tokens prefilled, 0 reused from the cache$", out, re.MULTILINE)
    assert re.search(r"^generated: 5 tokens, finish max_tokens$", out, re.MULTILINE)
    # a 4-token window: past 10 tokens the cache is below fp16 KV, and the words say so
    assert re.search(r"^cache xquant-4: [\d.]+ KiB for \d\d+ tokens: [\d.]+x smaller than fp16 KV \([\d.]+ KiB\), "
                     r"[\d.]+x smaller than float32 KV", out, re.MULTILINE)
    assert re.search(r"^compression: smaller than fp16 KV from 10 tokens on; past the 4-token window [\d,]+ "
                     r"B/token, [\d.]+x smaller than fp16 KV \([\d,]+ B/token\)$", out, re.MULTILINE)
    assert re.search(r"^context: \d+ tokens held, [\d,]+ tokens left \(capped by the 512-token allocation\)$",
                     out, re.MULTILINE)
    assert re.search(r"^allocated: [\d.]+ KiB for 512 tokens$", out, re.MULTILINE)
    assert "error: top-p must be in (0, 1] (got 2.0)" in err and "temperature=0.5" in err
    assert "error: unknown command /frobnicate" in err and "/nonexistent.safetensors does not exist" in err
    assert "saved" in err and session.is_file()
    # /help lists the commands, itself too, on stderr with the other listings: stdout holds answers and reports
    assert "/load FILE       restore a saved session" in err and "/help            this list" in err
    assert "/load FILE" not in out
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


def _take_terminal() -> None:
    """In the child, before exec: its stdin (the pty) becomes its controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Pty:
    """A child process on a pseudo-terminal (stdin, stdout and stderr), read with select and timeouts. The
    terminal is the child's controlling terminal, as in a real shell: a Ctrl-C byte written to it (`ctrl_c`)
    is echoed by the line discipline and becomes SIGINT, exactly as when a user presses the keys."""

    def __init__(self, args: list[str], cols: int = 160, rows: int = 50) -> None:
        self.master, slave = os.openpty()
        self.cols, self.rows = cols, rows
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = dict(os.environ, TERM="xterm-256color", COLUMNS=str(cols), LINES=str(rows))
        env.pop("NO_COLOR", None)
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT,
                                     close_fds=True, start_new_session=True,
                                     preexec_fn=_take_terminal)  # noqa: PLW1509 (one ioctl, no locks)
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

    def ctrl_c(self) -> None:
        os.write(self.master, b"\x03")

    def screen(self) -> Screen:
        """What the terminal shows (with its scrollback) after everything read so far."""
        screen = Screen(self.cols, self.rows)
        screen.feed(self.raw.decode("utf-8", "replace"))
        return screen

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


class Screen:
    """Just enough of an xterm to replay what rich's Live writes: printable characters wrap at the width
    (a full line leaves the cursor waiting in the last column, as a terminal does), CR, LF, cursor up
    (never above the visible screen), erase in line; colours and cursor visibility are ignored. Lines
    that scroll off the top stay in `lines` (the scrollback)."""

    TOKEN = re.compile(r"\x1b\[([0-?]*)[ -/]*([@-~])|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]|\x1b[=>]|[^\x1b]")

    def __init__(self, cols: int, rows: int) -> None:
        self.cols, self.rows = cols, rows
        self.lines: list[list[str]] = [[]]
        self.y = self.x = 0

    def feed(self, text: str) -> None:
        for m in self.TOKEN.finditer(text):
            ch, arg, cmd = m.group(0), m.group(1), m.group(2)
            if cmd == "A":
                self.y = max(self.y - int(arg or 1), len(self.lines) - self.rows, 0)
            elif cmd == "K":
                self.lines[self.y] = [] if arg == "2" else self.lines[self.y][:self.x]
            elif ch == "\r":
                self.x = 0
            elif ch == "\n":
                self._down()
            elif not ch.startswith("\x1b") and ch >= " ":
                if self.x == self.cols:  # the pending wrap of a full line
                    self.x = 0
                    self._down()
                line = self.lines[self.y]
                line.extend(" " * (self.x + 1 - len(line)))
                line[self.x] = ch
                self.x += 1

    def _down(self) -> None:
        self.y += 1
        if self.y == len(self.lines):
            self.lines.append([])

    @property
    def text(self) -> str:
        return "\n".join("".join(line).rstrip() for line in self.lines)


def xq_chat(model: str, *args: str) -> Pty:
    return Pty([str(Path(sys.executable)), "-m", "xqcli", "chat", model, *args])


def test_chat_ctrl_c_stops_the_answer_not_the_session(tiny_gguf):
    p = xq_chat(tiny_gguf, "--cache", "kv", "--temperature", "0", "-n", "100000", "--context", "4096",
               "--allow-long-context", "--no-mem")  # a long answer, to interrupt
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
        assert re.search(r"3 tokens, [\d.]+ tok/s \| cache kv [\d.]+ KiB for \d+ tokens: 2.0x larger than fp16 KV", out)
        p.send("/exit")
        assert p.proc.wait(30) == 0
    finally:
        p.close()


def test_chat_ctrl_c_under_the_live_panel_leaves_the_partial_answer_once(tiny_gguf, tmp_path):
    """Ctrl-C typed at the terminal while the live panel streams an answer: the partial answer is on the
    screen exactly once (the echoed ^C must not shift the panel so that its erase leaves a stale copy)."""
    from safetensors import safe_open

    session = tmp_path / "s.safetensors"
    # greedy with a repeat penalty, the tiny model answers with newlines and then one long line of U+FFFD
    p = xq_chat(tiny_gguf, "--cache", "kv", "--temperature", "0", "--repeat-penalty", "1.5", "-n", "100000",
                "--context", "4096", "--allow-long-context")
    try:
        p.expect(r"(?m)^>>> ", 120)
        p.send("tell me a long story")
        p.expect("\ufffd{8}", 60)  # the unfinished line streams above the panel
        p.ctrl_c()
        p.expect(r"\[interrupted\]", 30)
        p.expect(r"(?m)^>>> ", 30)
        p.turn(f"/save {session}", 30)
        p.send("/exit")
        assert p.proc.wait(30) == 0
    finally:
        p.close()
    with safe_open(str(session), "pt") as f:
        answer = json.loads(f.metadata()["session"])["messages"][-1]["content"]
    screen = p.screen().text
    assert answer.count("\ufffd") > 8 and screen.count("\ufffd") == answer.count("\ufffd"), screen[-3000:]
    assert "^C" not in screen


def test_chat_banner_and_live_panel_speak_plain_words(tiny_gguf):
    """The banner names the cache in words (no "decode eager"); the live panel, the line after the answer
    and /mem say the same memory numbers the same way, with directions and one "tokens left"."""
    p = xq_chat(tiny_gguf, "--cache", "xquant-4", "--window", "4", "--temperature", "0", "-n", "40",
                "--context", "512")
    try:
        prompt = p.expect(r"(?m)^>>> ", 120)
        banner = p.text[:prompt.start()]
        assert "cache: xquant-4 (4-bit X cache, newest 4 tokens kept exact)" in banner, banner
        assert "context 512 tokens" in banner and "decode" not in banner and "window 4)" not in banner
        answer = p.turn("hello there")
        screen = p.screen().text
        words = re.compile(r"cache xquant-4 ([\d.]+ KiB) for (\d+) tokens: ([\d.]+x (?:larger|smaller)) than fp16 KV")
        line = re.search(r"40 tokens, [\d.]+ tok/s \| " + words.pattern + r".*\| smaller than fp16 KV from ([\d,]+) "
                         r"tokens on; past the 4-token window .* \| allocated [\d.]+ KiB for 512 tokens, ([\d,]+) "
                         r"tokens left \(capped by the 512-token allocation\)", " ".join(screen.split()))
        assert line, screen[-3000:]
        held = int(line.group(2))
        assert int(line.group(5).replace(",", "")) == 512 - held
        # the panel streamed while the answer was written (the transcript keeps its frames)
        assert re.search(r"cache xquant-4\s+[\d.]+ KiB for \d+ tokens: [\d.]+x (larger|smaller) than fp16 KV", answer)
        assert re.search(r"context\s+\d+ tokens held, [\d,]+ tokens left \(capped by", answer)
        assert re.search(r"allocated\s+[\d.]+ KiB for 512 tokens", answer)
        assert re.search(r"device cpu\s+RSS [\d.,]+ [KMG]iB, peak [\d.,]+ [KMG]iB", answer)
        mem = " ".join(p.turn("/mem", 30).split())
        assert f"cache xquant-4 {line.group(1)} for {held} tokens: {line.group(3)} than fp16 KV" in mem, mem
        assert f"smaller than fp16 KV from {line.group(4)} tokens on" in mem
        rss, peak = (in_bytes(v, u) for v, u in re.findall(r"(?:RSS|peak) ([\d.,]+) ([KMG]iB)", mem))
        assert peak >= rss
        p.send("/exit")
        assert p.proc.wait(30) == 0
    finally:
        p.close()


def in_bytes(value: str, unit: str) -> float:
    """A size as `format_bytes` prints it ("1.02", "GiB") in bytes."""
    return float(value.replace(",", "")) * {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]


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
        assert "cache: xquant-4 (4-bit X cache, newest 128 tokens kept exact)" in p.text[:banner.start()]
        first = p.turn("My name is Alice and my cat is called Tom.")
        # the live panel streamed on stderr, with xq plan's bytes per token and ratio for this kind
        assert re.search(rf"past the 128-token window {row.bytes_per_token:,.0f} B/token, {row.ratio:.1f}x smaller than "
                         r"fp16 KV", first)
        assert re.search(r"context\s+\d+ tokens held, [\d,]+ tokens left \(capped by the 4,096-token allocation\)", first)
        assert "fp window" in first and re.search(r"allocated\s+[\d.]+ MiB for 4,096 tokens", first) and "decode" in first
        second = p.turn("What is the name of my cat?")
        assert re.search(r"12 tokens, [\d.]+ tok/s \| cache xquant-4 [\d.]+ [KM]iB for \d+ tokens: [\d.]+x larger than "
                         r"fp16 KV", second)  # a short conversation: the window dominates, and it says so
        stats = p.turn("/stats")
        m = re.search(r"prompt\s+(\d+) tokens prefilled, (\d+) reused from the cache", stats)
        assert m and int(m.group(2)) > 0  # the second turn reused the first turn's cache
        assert re.search(r"generated\s+12 tokens, finish max_tokens", stats)
        mem = p.turn("/mem")
        m = re.search(r"past the 128-token window ([\d,]+) B/token, ([\d.]+)x smaller than fp16 KV \(([\d,]+) B/token\)",
                      mem)
        assert m, mem
        assert int(m.group(1).replace(",", "")) == row.bytes_per_token
        assert int(m.group(3).replace(",", "")) == 30 * 2 * 192 * 2 and m.group(2) == f"{row.ratio:.1f}"
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
