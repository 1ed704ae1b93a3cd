"""The `xq` command: a thin Typer shell over the library, with one error boundary.

Importing this module must stay cheap: torch, triton and huggingface_hub are imported inside
command bodies only (a test checks `sys.modules`).
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

# Spinning OpenMP threads make a busy CPU several times slower (decode 0.3-1.5 tok/s instead of a steady
# 10 on a shared 2-core machine); must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import typer  # noqa: E402
from typer.core import TyperCommand, TyperGroup  # noqa: E402

from xqcli import __version__

HELP = f"""xq {__version__}: XQuant (arXiv 2508.10395) for Llama-family LLMs.

Instead of a KV cache, each layer caches its low-bit quantized post-norm input X (for grouped-query
models the SVD latents X·U_k, X·U_v) and rebuilds K and V on the fly; XQuant-CL caches closed-loop
cross-layer deltas of X. Cache kinds everywhere: kv, kivi-B, xquant-B, xquant-cl-B (B = 2, 3, 4, 8).

Commands: convert (HF id / folder / .gguf -> bundle), chat, generate, eval (perplexity through the
cache), bench (memory and speed side by side), plan (bytes per token, longest context for a budget),
inspect (a bundle), doctor (this machine), serve (an OpenAI-compatible server: the smaller cache
holds more concurrent sessions).
"""

class StdoutClosed(Exception):
    """The reader of stdout went away (`| head`): the end of the output, not an error of xq's."""


def _bare_flags(params: list) -> None:
    """Flags take no value: without a metavar Typer shows `<bool>` beside them, which reads as `--json true`."""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""


class _Command(TyperCommand):
    def format_help(self, ctx, formatter):
        _bare_flags(self.get_params(ctx))
        return super().format_help(ctx, formatter)


class _Group(TyperGroup):
    def format_help(self, ctx, formatter):
        _bare_flags(self.get_params(ctx))
        return super().format_help(ctx, formatter)

    def invoke(self, ctx):
        """Turn EPIPE into `StdoutClosed` before Typer's own handler sees it (that one exits 1)."""
        try:
            return super().invoke(ctx)
        except BrokenPipeError as e:
            raise StdoutClosed() from e


# Markdown, not Rich markup: "[...]" is text (org/name[@revision], xqcli[serve]) and a paragraph's line breaks
# are spaces, so help reflows to any width.
app = typer.Typer(cls=_Group, help=HELP, add_completion=True, pretty_exceptions_enable=False,
                  rich_markup_mode="markdown", context_settings={"help_option_names": ["-h", "--help"]})


def _version(value: bool) -> None:
    if value:
        typer.echo(f"xq {__version__} (XQuant, arXiv 2508.10395)")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Show the version and exit.")] = False,
) -> None:
    if ctx.invoked_subcommand is None:  # a bare `xq`: the help, and success (nothing went wrong)
        text = ctx.get_help()  # Typer's rich help prints itself and returns ""; plain click returns the text
        if text:
            typer.echo(text)


def _register() -> None:
    """Every command is a plain module-level function; this is the one place that names them."""
    from xqcli.commands import bench, chat, convert, doctor, eval_cmd, generate, inspect_cmd, plan, serve

    app.command("convert", cls=_Command, epilog=_examples(convert.EXAMPLES))(convert.convert)
    app.command("chat", cls=_Command, help=chat.HELP, epilog=_examples(chat.EXAMPLES))(chat.chat)
    app.command("generate", cls=_Command, epilog=_examples(generate.EXAMPLES))(generate.generate)
    app.command("eval", cls=_Command, epilog=_examples(eval_cmd.EXAMPLES))(eval_cmd.eval_)
    app.command("bench", cls=_Command, epilog=_examples(bench.EXAMPLES))(bench.bench)
    app.command("plan", cls=_Command, epilog=_examples(plan.EXAMPLES))(plan.plan)
    app.command("inspect", cls=_Command, epilog=_examples(inspect_cmd.EXAMPLES))(inspect_cmd.inspect)
    app.command("doctor", cls=_Command, epilog=_examples(doctor.EXAMPLES))(doctor.doctor)
    app.command("serve", cls=_Command, epilog=_examples(serve.EXAMPLES))(serve.serve)


def _examples(lines: tuple[str, ...]) -> str:
    """A command's EXAMPLES under its help (blank lines keep Typer from joining them into one paragraph)."""
    return "Examples:\n\n" + "\n\n".join(f"  {line}" for line in lines)


_register()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script: maps every library error to one stderr line and an exit code."""
    from xqcli.errors import XQError

    debug = os.environ.get("XQ_DEBUG") == "1"
    _open_closed_streams()
    _wide_help_in_pipes()
    try:
        rv = app(args=argv, prog_name="xq", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
        if code == 130:  # Typer turns Ctrl-C into a plain exit code 130
            _error_line("interrupted", None)
    except XQError as e:
        if debug:
            raise
        _error_line(str(e), e.hint)
        code = e.exit_code
    except (KeyboardInterrupt, typer.Abort):
        _error_line("interrupted", None)
        code = 130
    except (BrokenPipeError, StdoutClosed):  # README: a closed pipe ends quietly, exit 0, as `> /dev/null`
        _discard_stdout()
        code = 0
    except Exception as e:  # the boundary: anything else is a bug, shown briefly unless XQ_DEBUG=1
        if debug:
            raise
        if _is_usage_error(e):  # Typer's (vendored) click errors: bad options and arguments
            ctx = getattr(e, "ctx", None)
            where = ctx.command_path if ctx is not None else "xq"
            _error_line(e.format_message(), f"see '{where} --help'")
            code = e.exit_code
        else:
            _error_line(f"internal error: {type(e).__name__}: {e}", "run again with XQ_DEBUG=1 and report the traceback")
            code = 1
    return _finish(code, argv)


def _wide_help_in_pipes() -> None:
    """Rich lays help out 80 columns wide in a pipe, where it cuts long option names and words with '…'
    (`xq serve --help | less`); xq's output in a pipe is never cut (README), so help gets 160 columns there.
    COLUMNS and Typer's TERMINAL_WIDTH still decide when set."""
    if "COLUMNS" in os.environ or "TERMINAL_WIDTH" in os.environ or sys.stdout.isatty():
        return
    import typer.rich_utils

    typer.rich_utils.MAX_WIDTH = 160


def _open_closed_streams() -> None:
    """A standard stream the caller closed (`>&-`, `<&-`) becomes /dev/null: output goes nowhere, input is
    empty. Its descriptor must not stay free either, or the next file opened (a model) would take it."""
    for fd, name, flags in ((0, "stdin", os.O_RDONLY), (1, "stdout", os.O_WRONLY), (2, "stderr", os.O_WRONLY)):
        if getattr(sys, name) is None:
            null = os.open(os.devnull, flags)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            setattr(sys, name, open(fd, "r" if flags == os.O_RDONLY else "w", closefd=False))


def _discard_stdout() -> None:
    """After EPIPE, point stdout at /dev/null so the interpreter's final flush of it cannot fail loudly."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError):  # a stdout without a descriptor (tests capture it in memory)
        pass


def _finish(code: int, argv: list[str] | None) -> int:
    if argv is None:
        sys.exit(code)
    return code


def _is_usage_error(e: Exception) -> bool:
    """Click's ClickException interface, whichever copy of click raised it."""
    return isinstance(getattr(e, "exit_code", None), int) and callable(getattr(e, "format_message", None))


def _error_line(message: str, hint: str | None) -> None:
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    text = f"[bold red]error:[/] {escape(message)}"
    if hint:
        text += f" [dim]({escape(hint)})[/]"
    console.print(text)
