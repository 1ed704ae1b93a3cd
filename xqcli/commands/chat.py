"""`xq chat`: an interactive conversation through any cache kind, with a live memory panel.

The loop, the slash commands and the rendering live here; generation is `xqcli.engine.Engine`.
Output rules: answers go to stdout; the live panel, the banner, the per-turn summary, status lines and
the /help, /set and /system listings go to stderr. When stdout is not a terminal, answers are plain
streamed text, there is no panel, and `/stats` and `/mem` print plain `key: value` lines to stdout.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional

import typer

from xqcli.commands._options import (
    MAX_INT,
    AllowLongContextOpt,
    BitsOpt,
    CacheOpt,
    ChatContextOpt,
    CudaGraphOpt,
    DeviceOpt,
    DtypeOpt,
    MinPOpt,
    OfflineOpt,
    RepeatPenaltyOpt,
    RevisionOpt,
    SeedOpt,
    StopOpt,
    TemperatureOpt,
    TopKOpt,
    TopPOpt,
    WindowOpt,
    at_most,
    is_utf8,
    utf8_text,
)

EXAMPLES = ('xq chat smollm2-xq',
            'xq chat HuggingFaceTB/SmolLM2-135M-Instruct --cache xquant-cl-3 --context 8k')

if TYPE_CHECKING:
    from xqcli.engine import Engine

CHAT_DEFAULTS = {"temperature": 0.7, "top_p": 0.95, "min_p": 0.05}

INPUT_HELP = """\
Enter sends a line; a line ending with \\ continues on the next one.
A line starting with \"\"\" opens a block that ends at a line ending with \"\"\"
(for pasting code or text). Ctrl-C stops the answer, not the session.
Ctrl-D or /exit quits."""

COMMANDS_HELP = """\
/stats           the last answer: tokens, prefill and decode speed
/mem             the cache now against fp16 KV and the model dtype's KV,
                 where compression starts, allocated size, tokens left
/reset           forget the conversation (alias /clear)
/system TEXT     set the system prompt (no TEXT: show it)
/set KEY VALUE   temperature, top_k, top_p, min_p, repeat_penalty,
                 seed (or none), max_tokens; /set alone shows them
/save FILE       save the conversation and its cache (safetensors)
/load FILE       restore a saved session and continue it
/help            this list (alias /?)
/exit            quit (alias /quit, /bye)"""

# `--help` is Markdown (xqcli/cli.py): the two aligned blocks are code blocks there.
HELP = (f"Chat with a model through an XQuant (or any) cache, with a live memory panel.\n\n"
        f"Input:\n\n```text\n{INPUT_HELP}\n```\n\nCommands:\n\n```text\n{COMMANDS_HELP}\n```\n")


def read_message(read_line: Callable[[str], Optional[str]], prompt: str, more: str) -> Optional[str]:
    """One user message: a line, `\\`-continued lines, or a \"\"\" block. None at end of input."""
    first = read_line(prompt)
    if first is None:
        return None
    if first.lstrip().startswith('"""'):
        rest = first.lstrip()[3:]
        if rest.rstrip().endswith('"""'):
            return rest.rstrip()[:-3]
        lines = [rest] if rest else []
        while True:
            line = read_line(more)
            if line is None:
                break
            if line.rstrip().endswith('"""'):
                tail = line.rstrip()[:-3]
                if tail:
                    lines.append(tail)
                break
            lines.append(line)
        return "\n".join(lines)
    lines, line = [], first
    while line.endswith("\\"):
        lines.append(line[:-1])
        nxt = read_line(more)
        if nxt is None:
            line = ""
            break
        line = nxt
    lines.append(line)
    return "\n".join(lines)


class ChatSession:
    """The REPL: conversation, slash commands, streaming and the live panel."""

    def __init__(self, engine: Engine, source: str, system: str | None, *, panel: bool, out, err) -> None:
        self.engine, self.source = engine, source
        self.system = system
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        self.panel = panel
        self.out, self.err = out, err  # rich consoles: stdout, stderr
        self.plain = not out.is_terminal
        self.turns = 0

    # --- output helpers ------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        """A status line on stderr."""
        self.err.print(f"[dim]{_esc(text)}[/]")

    def show(self, plain_lines: list[str], table) -> None:
        """/stats, /mem: a rich table on a terminal, plain lines otherwise."""
        if self.plain:
            sys.stdout.write("\n".join(plain_lines) + "\n")
            sys.stdout.flush()
        else:
            self.out.print(table)

    def error(self, e: Exception) -> None:
        from rich.markup import escape

        hint = getattr(e, "hint", None)
        self.err.print(f"[bold red]error:[/] {escape(str(e))}" + (f" [dim]({escape(hint)})[/]" if hint else ""))

    # --- commands ----------------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a slash command; False means quit."""
        from xqcli.engine import load_session, parse_setting, save_session
        from xqcli.errors import InputError
        from xqcli.readouts.stats import generation_lines, generation_table, memory_lines, memory_table

        cmd, _, arg = line.strip().partition(" ")
        cmd, arg = cmd.lower(), arg.strip()
        if cmd in ("/exit", "/quit", "/bye"):
            return False
        if cmd in ("/help", "/?"):
            self.err.print(COMMANDS_HELP, markup=False, highlight=False)  # a listing, as /set's: never among answers
        elif cmd == "/stats":
            stats = self.engine.stats
            self.show(generation_lines(stats), generation_table(stats))
        elif cmd == "/mem":
            mem = self.engine.memory()
            self.show(memory_lines(mem), memory_table(mem))
        elif cmd in ("/reset", "/clear"):
            self.messages = [{"role": "system", "content": self.system}] if self.system else []
            self.engine.reset()
            self.say("conversation cleared")
        elif cmd == "/system":
            if not arg:
                self.say(f"system prompt: {self.system!r}" if self.system else "no system prompt")
            else:
                self.system = arg
                self.messages = [m for m in self.messages if m["role"] != "system"]
                self.messages.insert(0, {"role": "system", "content": arg})
                self.say("system prompt set (the cache is rebuilt on the next answer)")
        elif cmd == "/set":
            key, _, value = arg.partition(" ")
            if not key:
                self.say(", ".join(f"{k}={v}" for k, v in self.engine.sampling.as_dict().items()))
            elif not value.strip():
                raise InputError(f"/set {key} needs a value", hint="e.g. /set temperature 0.2")
            else:
                self.engine.sampling = self.engine.sampling.with_(**parse_setting(key, value))
                self.say(", ".join(f"{k}={v}" for k, v in self.engine.sampling.as_dict().items()))
        elif cmd == "/save":
            if not arg:
                raise InputError("/save needs a file name", hint="e.g. /save chat.safetensors")
            save_session(Path(arg).expanduser(), self.engine, self.messages, self.source)
            self.say(f"saved {len(self.engine.ids[0]):,} tokens and {len(self.messages)} messages to {arg}")
        elif cmd == "/load":
            if not arg:
                raise InputError("/load needs a file name")
            meta = load_session(Path(arg).expanduser(), self.engine, self.source)
            self.messages = list(meta["messages"])
            sys_msgs = [m["content"] for m in self.messages if m.get("role") == "system"]
            self.system = sys_msgs[0] if sys_msgs else None
            self.say(f"loaded {len(self.engine.ids[0]):,} tokens and {len(self.messages)} messages from {arg}")
        else:
            raise InputError(f"unknown command {cmd}", hint="/help lists the commands")
        return True

    # --- one answer ----------------------------------------------------------------------------------
    def answer(self, text: str) -> None:
        from xqcli.errors import XQError
        from xqcli.readouts.stats import memory_summary

        self.messages.append({"role": "user", "content": text})
        engine = self.engine
        pieces: list[str] = []
        sink = _PanelSink(self) if self.panel else _PlainSink(self)

        def on_sigint(signum, frame):  # first Ctrl-C: finish this step and stop; second: abort now
            if engine._stop:
                raise KeyboardInterrupt
            engine.request_stop()

        old = signal.signal(signal.SIGINT, on_sigint)
        interrupted = False
        try:
            with _keys_unechoed(), sink:
                for step in engine.chat_turn(self.messages):
                    pieces.append(step.text)
                    sink.piece(step.text)
        except KeyboardInterrupt:
            interrupted = True
        except XQError as e:
            self.messages.pop()
            self.error(e)
            return
        finally:
            signal.signal(signal.SIGINT, old)
        self.turns += 1
        stats = engine.stats
        if interrupted or "interrupted" in stats.finish:
            self.say("[interrupted]")
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
        self.say(f"{stats.generated_tokens} tokens, {stats.decode_tok_s:.1f} tok/s | {memory_summary(engine.memory())}")

    def run(self, read_line: Callable[[str], Optional[str]], prompt: str, more: str) -> None:
        from xqcli.errors import InputError, XQError

        while True:
            try:
                text = read_message(read_line, prompt, more)
            except KeyboardInterrupt:
                self.err.print()
                self.say("(Ctrl-D or /exit quits)")
                continue
            if text is None:
                return
            if not text.strip():
                continue
            if not is_utf8(text):
                self.error(InputError("this line is not valid UTF-8 and was not sent",
                                      hint="check the terminal's encoding (e.g. LANG=en_US.UTF-8)"))
                continue
            word = text.split()[0]
            if word.startswith("/") and "/" not in word[1:]:  # a command; "/etc/hosts ..." is a message
                try:
                    if not self.command(text):
                        return
                except (XQError, OSError) as e:  # a failed command never ends the conversation
                    self.error(e)
                continue
            self.answer(text)


class _PlainSink:
    """Streams pieces straight to stdout."""

    def __init__(self, session: ChatSession) -> None:
        self.s = session

    def __enter__(self):
        return self

    def piece(self, text: str) -> None:
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()

    def __exit__(self, *exc) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()


class _PanelSink:
    """rich Live on stderr: the unfinished line of the answer above the memory panel; finished lines are
    printed above the live area (rich's print-above-live), so the terminal keeps a clean transcript."""

    REFRESH_S = 0.1

    def __init__(self, session: ChatSession) -> None:
        self.s = session
        self.line = ""
        self.last = 0.0
        self.live = None

    def __enter__(self):
        from rich.live import Live

        self.live = Live(self._render(), console=self.s.err, transient=True, auto_refresh=False,
                         redirect_stdout=False, redirect_stderr=False)
        self.live.start(refresh=True)  # the panel shows during the prefill too
        return self

    def _render(self):
        from rich.console import Group
        from rich.panel import Panel
        from rich.text import Text

        from xqcli.readouts.render import key_value_table
        from xqcli.readouts.stats import panel_rows

        e = self.s.engine
        mem = e.memory()
        table = key_value_table(None, panel_rows(mem, e.stats))
        panel = Panel(table, title=f"xq · {e.spec.name} · {mem.device}", title_align="left", border_style="dim")
        return Group(Text(self.line), panel) if self.line else panel

    def piece(self, text: str) -> None:
        self.line += text
        if "\n" in self.line:
            done, self.line = self.line.rsplit("\n", 1)
            self.live.console.print(done, markup=False, highlight=False, soft_wrap=True)
        now = time.monotonic()
        if now - self.last >= self.REFRESH_S:
            self.last = now
            self.live.update(self._render(), refresh=True)

    def __exit__(self, *exc) -> None:
        self.live.stop()
        self.s.err.print(self.line, markup=False, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def _keys_unechoed() -> Iterator[None]:
    """While an answer streams, keys typed at the terminal are not echoed: an echoed ^C lands under the live
    panel and shifts it down a line, so rich's erase misses the top and the partial answer stays on screen
    twice. Keys are still read: Ctrl-C still sends SIGINT, typed text waits for the next prompt."""
    try:
        import termios
    except ImportError:  # not POSIX
        yield
        return
    try:
        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
    except (OSError, ValueError, termios.error):  # stdin is not a terminal
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~(termios.ECHO | getattr(termios, "ECHOCTL", 0))
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def _esc(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def chat(
    model: Annotated[str, typer.Argument(help="Bundle, model folder, .gguf file or HF id org/name[@revision].")],
    cache: CacheOpt = None,
    bits: BitsOpt = None,
    window: WindowOpt = None,
    system: Annotated[Optional[str], typer.Option(
        "--system", "-s", callback=utf8_text, help="System prompt.")] = None,
    context: ChatContextOpt = None,
    allow_long_context: AllowLongContextOpt = False,
    max_tokens: Annotated[int, typer.Option(
        "--max-tokens", "-n", callback=at_most(MAX_INT), help="Tokens per answer at most.")] = 512,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatPenaltyOpt = None,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    chat_template: Annotated[Optional[Path], typer.Option(
        "--chat-template", help="Jinja chat template file (or chat_template.json).")] = None,
    budget: Annotated[Optional[str], typer.Option(
        "--budget", help="Memory for the cache, e.g. 8GiB: a cache that needs more is refused (exit 7), and 'tokens "
                         "left' counts against it (default: free GPU memory, or available RAM on CPU).")] = None,
    mem: Annotated[bool, typer.Option("--mem/--no-mem", help="The live memory panel (on a terminal only).")] = True,
    cuda_graph: CudaGraphOpt = True,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    revision: RevisionOpt = None,
    offline: OfflineOpt = None,
) -> None:
    from rich.console import Console

    from xqcli.bundle.defaults import choose_spec
    from xqcli.engine import Engine, SamplingParams
    from xqcli.errors import InputError
    from xqcli.load import load
    from xqcli.readouts.stats import cache_words
    from xqcli.sources.hub import apply_offline
    from xqcli.units import parse_bytes, parse_tokens

    params = SamplingParams(**CHAT_DEFAULTS, max_tokens=max_tokens).with_(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed,
        stop=stop)
    ctx = parse_tokens(context) if context is not None else None
    budget_b = parse_bytes(budget) if budget else None
    if cache is not None:
        choose_spec(cache, bits=bits, window=window)  # fail on a bad kind before loading anything
    apply_offline(offline)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    out = Console(highlight=False)
    if hasattr(sys.stdin, "reconfigure"):  # an undecodable line becomes an error message, not the end of the chat
        sys.stdin.reconfigure(errors="surrogateescape")
    # a spinner only on a terminal: elsewhere rich ends it with a blank line, before any error
    with err.status(f"loading {model}") if err.is_terminal else contextlib.nullcontext():
        loaded = load(model, dtype=dtype, device=device, revision=revision)
        tok = loaded.tokenizer()
        if chat_template is not None:
            tok.use_chat_template_file(chat_template)
        if tok.chat_template is None:
            raise InputError(f"{model} has no chat template", hint="pass --chat-template FILE")
        bundle_defaults = loaded.bundle.manifest.get("cache_defaults") if loaded.bundle is not None else None
        spec = choose_spec(cache, bits=bits, window=window, cache_defaults=bundle_defaults)
        engine = Engine(loaded.model, tok, spec, context=ctx, cuda_graph=cuda_graph, sampling=params,
                        budget=budget_b, artifacts=loaded.artifacts, allow_long_context=allow_long_context)
    source = loaded.source.describe()
    graph = ""
    if engine.device.type == "cuda":
        graph = f" · CUDA graph: {'on' if engine.decode_mode == 'cuda-graph' else 'off'}"
    err.print(f"[bold]xq chat[/] [dim]· {_esc(source)} · cache: {_esc(cache_words(engine.spec))} · "
              f"{engine.device} {str(loaded.model.dtype).removeprefix('torch.')} · context {engine.context:,} tokens"
              f"{graph} · /help for commands[/]")
    if engine.decode_note:
        err.print(f"[dim]{_esc(engine.decode_note)}[/]")
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    panel = mem and out.is_terminal and err.is_terminal
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    session = ChatSession(engine, source, system, panel=panel, out=out, err=err)

    def read_line(prompt: str) -> Optional[str]:
        try:
            return input(prompt)
        except EOFError:
            return None

    session.run(read_line, ">>> " if interactive else "", "... " if interactive else "")

