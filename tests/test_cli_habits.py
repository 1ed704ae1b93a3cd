"""Habits users bring from llama.cpp and friends, in a terminal and in pipes: a bare `xq`, examples in every help,
shell completion, shipped docs, `-c 4096`, `--ctx-size`, `-p -`, `-f`, `--offline`, the default cache of
`generate`, tables that are never cut, `--format`, download bars on a terminal only, `doctor`, and `eval` on a
plain install. Terminal behaviour is driven through a pseudo-terminal."""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
from schemas import assert_valid

from xqcli.cli import main

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("convert", "chat", "generate", "eval", "bench", "plan", "inspect", "doctor")


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    return lines[0]


def xq(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xqcli", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, **kw)


def on_pty(argv: list[str], *, stream: str, columns: int = 80, env: dict[str, str] | None = None,
           timeout: float = 600) -> tuple[int, str, str]:
    """Run argv with `stream` (stdout or stderr) on a pseudo-terminal of `columns` columns and the other one on a
    pipe: (exit code, what the terminal showed, what the pipe got)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")} | (env or {})
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE} | {stream: slave}
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=env, **pipes)
    os.close(slave)
    other = proc.stderr if stream == "stdout" else proc.stdout
    shown, piped = b"", b""
    while True:
        ready, _, _ = select.select([master, other], [], [], timeout)
        if not ready:
            proc.kill()
            raise TimeoutError(argv)
        if master in ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                chunk = b""
            shown += chunk
            if not chunk:
                break
        if other in ready:
            piped += other.read1(65536)
    piped += other.read()
    os.close(master)
    return proc.wait(), shown.decode("utf-8", "replace"), piped.decode("utf-8", "replace")


@pytest.fixture(scope="module")
def tiny_gguf() -> str:
    import assets

    return str(assets.tiny_gguf("llama"))


@pytest.fixture(scope="module")
def tiny_bundle(tiny_gguf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "b"
    assert main(["convert", tiny_gguf, "-o", str(out), "--dtype", "float32", "--calib-tokens", "32"]) == 0
    return out


@pytest.fixture()
def text_file(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text("The cat sat on the mat and looked at the dog, who looked back at the cat. " * 3)
    return path


# ----------------------------------------------------------------------------- first contact


def test_bare_xq_shows_help_and_succeeds(capsys):
    proc = xq()
    assert proc.returncode == 0, proc.stderr
    assert "Usage: xq" in proc.stdout and "generate" in proc.stdout and proc.stderr == ""
    code, out, err = run(capsys)
    assert code == 0 and "Usage: xq" in out and "error" not in err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_help_has_examples(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and "Examples:" in out
    assert len(re.findall(rf"^\s*(?:\S+ \| )?xq {command}\b", out, re.MULTILINE)) in (1, 2), out


def test_shell_completion_is_on(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "--install-completion" in out and "--show-completion" in out
    env = {"_XQ_COMPLETE": "complete_bash", "COMP_WORDS": "xq gen", "COMP_CWORD": "1"}
    assert xq(env=env).stdout.split() == ["generate"]
    env = {"_XQ_COMPLETE": "complete_bash", "COMP_WORDS": "xq generate --ctx", "COMP_CWORD": "2"}
    assert xq(env=env).stdout.split() == ["--ctx-size"]


def test_docs_cited_by_help_ship_in_the_package(capsys):
    """Every docs/NAME a help text cites is in the installed package (xqcli/docs) and matched by package-data."""
    cited = set()
    for command in COMMANDS:
        _, out, _ = run(capsys, command, "--help")
        cited |= set(re.findall(r"docs/([\w.-]+\.(?:md|json))", out.replace("\n", " ")))
    assert {"generate.schema.json", "bundle.md"} <= cited
    import xqcli

    package = Path(xqcli.__file__).parent
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["xqcli"]
    for name in cited:
        assert (package / "docs" / name).is_file(), name
        assert any(fnmatch(f"docs/{name}", g) for g in globs), (name, globs)
    code, out, _ = run(capsys, "doctor", "--json")
    assert Path(json.loads(out)["docs_dir"]) == package / "docs"


def test_help_in_a_pipe_is_never_cut():
    """`xq CMD --help | less`: Rich would lay the option tables out 80 columns wide and end long option names
    and words with '…'."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "TERMINAL_WIDTH")}
    for command in ("", *COMMANDS, "serve"):
        proc = subprocess.run([sys.executable, "-m", "xqcli", *([command] if command else []), "--help"],
                              capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0 and "--help" in proc.stdout and "…" not in proc.stdout, (command, proc.stdout)


@pytest.mark.parametrize("command", ("", *COMMANDS, "serve"))
def test_help_shows_every_word_its_source_has(capsys, monkeypatch, command):
    """Help is rendered as Markdown: brackets (`org/name[@revision]`, `xqcli[serve]`) are not markup there, but
    `<name>` would be an HTML tag and a leading `>` a quote. Every word of the command's help, epilog and option
    helps must reach the screen (backticks and code fences aside, which become code styling)."""
    import typer

    from xqcli.cli import app

    group = typer.main.get_command(app)
    cmd = group.commands[command] if command else group
    source = " ".join([cmd.help or "", cmd.epilog or ""] + [getattr(p, "help", None) or "" for p in cmd.params])
    monkeypatch.setenv("COLUMNS", "1000")  # no word folded at the edge
    code, out, _ = run(capsys, *([command] if command else []), "--help")
    shown = set(out.split())
    missing = {w for w in re.sub(r"```\w*", "", source).replace("`", "").split() if w not in shown}
    assert code == 0 and not missing, missing


def test_doctor_reports_token_source_extras_ram_and_threads(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    from huggingface_hub import constants

    token_file = tmp_path / "token"
    token_file.write_text("hf_not_a_real_token_0123456789")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token_file))
    code, out, _ = run(capsys, "doctor", "--json")
    report = json.loads(out)
    assert_valid(report, "doctor")
    assert report["hf"]["token"] is True and report["hf"]["token_source"] == f"the token file {token_file}"
    assert "hf_not_a_real" not in out
    assert report["memory"]["total_bytes"] >= report["memory"]["available_bytes"] > 0
    assert report["threads"]["torch"] >= 1 and report["threads"]["cpus"] >= 1
    assert set(report["extras"]) >= {"gguf", "plot", "test"}
    assert report["extras"]["test"]["installed"] and report["extras"]["gguf"]["packages"]["gguf"]
    code, out, _ = run(capsys, "doctor")
    assert code == 0 and f"set (from the token file {token_file})" in out and "hf_not_a_real" not in out
    for label in ("RAM", "threads", "extras", "docs"):
        assert re.search(rf"^{label}\s", out, re.MULTILINE), (label, out)
    token_file.unlink()
    monkeypatch.setenv("HF_TOKEN", "hf_another_fake_token_012345")
    code, out, _ = run(capsys, "doctor", "--json")
    assert json.loads(out)["hf"]["token_source"] == "the HF_TOKEN variable" and "hf_another" not in out


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize("command", ["generate", "chat", "bench"])
@pytest.mark.parametrize("value", ["4096", "32k"])
def test_numeric_c_is_answered_with_the_context_hint(capsys, tiny_gguf, command, value):
    code, _, err = run(capsys, command, tiny_gguf, *(["-p", "hi"] if command == "generate" else []), "-c", value)
    assert code == 2
    assert f"did you mean --context {value}" in one_error_line(err)


@pytest.mark.parametrize("argv,hint", [
    (["eval", "MODEL"], "did you mean --seq-len {tokens}?"),  # an integer option: 32k is 32768 there
    (["plan", "--shape", "smollm2-135m"], "plan takes cache kinds with -c and no context"),
])
@pytest.mark.parametrize("value", ["4096", "32k"])
def test_numeric_c_in_plan_and_eval_gets_their_own_hint(capsys, tiny_gguf, argv, hint, value):
    """plan has no --context and eval's window is --seq-len: each is told what it has (they got no hint)."""
    code, out, err = run(capsys, *[tiny_gguf if a == "MODEL" else a for a in argv], "-c", value)
    line = one_error_line(err)
    tokens = {"4096": 4096, "32k": 32768}[value]
    assert code == 2 and out == "" and hint.format(tokens=tokens) in line and "--context" not in line, line
    if argv[0] == "plan":
        assert "--budget" in line


def test_ctx_size_is_context(capsys, tiny_gguf):
    for flag in ("--context", "--ctx-size"):
        code, _, err = run(capsys, "generate", tiny_gguf, "-p", "hi", flag, "10m")
        assert code == 7 and "trained on" in one_error_line(err), err


def test_prompt_from_stdin_and_file(capsys, monkeypatch, tiny_gguf, tmp_path):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("the cat ünï\n".encode())))
    code, out, err = run(capsys, "generate", tiny_gguf, "-p", "-", "-n", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["prompt"] == "the cat ünï\n"
    (tmp_path / "p.txt").write_text("the dog")
    code, out, err = run(capsys, "generate", tiny_gguf, "-f", str(tmp_path / "p.txt"), "-n", "2", "--json")
    assert code == 0 and json.loads(out)["prompt"] == "the dog", err
    code, _, err = run(capsys, "generate", tiny_gguf, "-p", "-", "-f", str(tmp_path / "p.txt"))
    assert code == 2 and "exactly one of" in one_error_line(err)


def test_generate_uses_the_cache_chat_would(capsys, tiny_gguf, tiny_bundle):
    from xqcli.bundle.defaults import choose_spec

    code, out, err = run(capsys, "generate", tiny_gguf, "-p", "the cat", "-n", "2", "--json")
    assert code == 0 and json.loads(out)["cache"] == "xquant-4", err
    defaults = json.loads((tiny_bundle / "xq.json").read_text()).get("cache_defaults")
    code, out, err = run(capsys, "generate", str(tiny_bundle), "-p", "the cat", "-n", "2", "--json")
    assert code == 0 and json.loads(out)["cache"] == choose_spec(None, cache_defaults=defaults).name, err
    code, out, err = run(capsys, "generate", tiny_gguf, "-p", "the cat", "-n", "2", "--json", "-c", "kv")
    assert code == 0 and json.loads(out)["cache"] == "kv", err


@pytest.mark.parametrize("args", [["chat"], ["generate", "-p", "hi"], ["eval"], ["bench", "--device", "cpu"],
                                  ["convert"]])
def test_offline_on_every_command_that_can_download(capsys, monkeypatch, tmp_path, args):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored afterwards, whatever --offline sets
    extra = ["-o", str(tmp_path / "b")] if args[0] == "convert" else []
    code, _, err = run(capsys, args[0], "xq-test-nobody/not-a-model", *args[1:], *extra, "--offline")
    assert code == 5
    last = err.strip().splitlines()[-1]  # bench reports its steps first ("loading ...")
    assert last.startswith("error:") and "not in the local Hugging Face cache" in last, err


# ----------------------------------------------------------------------------- tables and formats


def test_tables_are_whole_when_piped():
    proc = xq("plan", "--shape", "llama-3.1-8b", "--budget", "24GiB", "--format", "table")
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout and "131,072" in proc.stdout and "632.00 KiB" in proc.stdout
    proc = xq("plan", "--shape", "llama-3.1-8b", "--budget", "24GiB")  # default in a pipe: markdown
    assert proc.returncode == 0 and "| kv | 131,072 | 131,072 | 1.000 | 1.00x | 0 B | 0 | 74,075 |" in proc.stdout


def test_tables_are_whole_on_a_narrow_terminal():
    code, shown, _ = on_pty([sys.executable, "-m", "xqcli", "plan", "--shape", "llama-3.1-8b", "--budget", "24GiB"],
                            stream="stdout", columns=60)
    assert code == 0 and "…" not in shown
    assert re.search(r"xquant-cl-2 .*19,968 .*632\.00 KiB .*344,766", shown), shown


def test_bench_table_is_whole_on_a_terminal(tiny_gguf):
    code, shown, err = on_pty([sys.executable, "-m", "xqcli", "bench", tiny_gguf, "--context", "32", "-c", "kv",
                               "--decode-tokens", "1", "--reps", "1", "--warmup", "0", "--device", "cpu"],
                              stream="stdout", columns=100)
    assert code == 0, err
    header = next(line for line in shown.splitlines() if "prefill tok/s" in line)
    assert "…" not in shown and "max context" in header and "floor ms" in header, shown


def format_args(command: str, tiny_gguf: str, tiny_bundle: Path, text_file: Path) -> list[str]:
    return {"plan": ["plan", "--shape", "smollm2-135m", "-c", "kv,xquant-4"],
            "inspect": ["inspect", str(tiny_bundle)],
            "eval": ["eval", tiny_gguf, "--text", str(text_file), "--seq-len", "32", "--methods", "kv,xquant-4"],
            }[command]


@pytest.mark.parametrize("command", ["plan", "inspect", "eval"])
def test_format_md_csv_json(capsys, tiny_gguf, tiny_bundle, text_file, command):
    args = format_args(command, tiny_gguf, tiny_bundle, text_file)
    code, as_json, _ = run(capsys, *args, "--json")
    code2, fmt_json, _ = run(capsys, *args, "--format", "json")
    assert code == code2 == 0
    obj = json.loads(fmt_json)
    assert_valid(obj, command)
    assert json.loads(as_json) == obj
    code, md, _ = run(capsys, *args, "--format", "md")
    assert code == 0 and re.search(r"^\|---\|---:", md, re.MULTILINE), md
    code, text, _ = run(capsys, *args, "--format", "csv")
    assert code == 0
    first = next(csv.reader(io.StringIO(text.split("\n\n")[0])))
    assert first[0] in ("cache", "method"), text
    code, _, err = run(capsys, *args, "--format", "xml")
    assert code == 2 and "unknown --format" in one_error_line(err)
    code, _, err = run(capsys, *args, "--format", "md", "--json")
    assert code == 2 and "disagree" in one_error_line(err)


def csv_tables(text: str) -> list[list[dict[str, str]]]:
    """The tables of `--format csv` output (an empty line between two), each as its rows {header: cell}."""
    return [list(csv.DictReader(io.StringIO(chunk))) for chunk in text.split("\n\n") if chunk.strip()]


def json_numbers(command: str, obj: dict) -> list[dict[str, dict[str, float | None]]]:
    """For each CSV table of `command`, {row label: {CSV header: the number `--json` holds for it}}: the CSV
    columns a spreadsheet should read as numbers (None: `--json` has none, the CSV cell is empty)."""
    if command == "plan":
        keys = {"bytes/token": "bytes_per_token", "paper formula": "paper_bytes_per_token",
                "vs fp16 KV": "normalized", "compression": "ratio", "fixed (bytes)": "fixed_bytes",
                "CL workspace/token": "workspace_bytes_per_token", "max context": "max_context"}
        return [{r["kind"]: {h: r[k] for h, k in keys.items()} for r in obj["rows"]}]
    if command == "eval":
        keys = {"bytes/token": "bytes_per_token", "vs fp16 KV": "normalized", "compression": "compression",
                "ppl": "ppl", "Δppl": "delta_ppl", "KL": "kl", "top-1 (fraction)": "top1"}
        return [{r["method"]: {h: r[k] for h, k in keys.items()} for r in obj["rows"]}]
    if command == "passkey":
        tables: dict[str, dict[str, dict[str, float | None]]] = {}
        for c in obj["cells"]:
            rows = tables.setdefault(c["protocol"], {})
            row = rows.setdefault(c["cache"], {"bytes/token": c["bytes_per_token"]})
            row[f"{c['length']} @{100 * c['depth']:.0f}% (fraction)"] = c["accuracy"]
        return list(tables.values())
    sizes = {r["kind"]: {"bytes/token": r["bytes_per_token"], "vs fp16 KV": r["vs_fp16_kv"]}
             for r in obj["bytes_per_token"]}
    layers = {}
    for rec in obj["calibration"]["layers"]:
        layers[str(rec["layer"])] = {"layer": rec["layer"], "max |X|": rec["x"]["max_abs"],
                                     "top ch": rec["x"]["top_channels"][0][0],
                                     "ch0 (fraction)": rec["latent"] and rec["latent"]["k_channel0_energy"],
                                     "K/V err": rec["kv_error"]["xquant"]["3"]}
        layers[str(rec["layer"])] |= {f"clip {b}-bit": rec["clip"]["xquant"][b] for b in ("2", "3", "4", "8")}
    return [sizes, layers]


@pytest.mark.parametrize("command", ["plan", "inspect", "eval", "passkey"])
def test_csv_cells_are_the_json_numbers(capsys, tiny_gguf, tiny_bundle, text_file, command):
    """CSV is for spreadsheets and scripts: every numeric cell a plain number ("6180", not "6,180"; "3.73",
    not "3.73x"; a fraction, not "92.7%"; bytes, not "1.41 MiB"), the very number `--json` has."""
    args = {"plan": ["plan", "--shape", "smollm2-135m", "--budget", "4GiB"],
            "passkey": ["eval", tiny_gguf, "--task", "passkey", "--text", "builtin", "--lengths", "256",
                        "--depths", "0,0.75", "--samples", "1", "-c", "kv,xquant-4", "--window", "32",
                        "--group-size", "32"],
            }.get(command) or format_args(command, tiny_gguf, tiny_bundle, text_file)
    code, out, err = run(capsys, *args, "--json")
    assert code == 0, err
    want = json_numbers(command, json.loads(out))
    code, text, err = run(capsys, *args, "--format", "csv")
    assert code == 0, err
    tables = csv_tables(text)
    assert len(tables) == len(want), text
    for rows, numbers in zip(tables, want, strict=True):
        label = next(iter(rows[0]))
        assert {r[label] for r in rows} == set(numbers), text
        for row in rows:
            expected = numbers[row[label]]
            assert set(row) - {label} == set(expected) - {label}, row
            for header, number in expected.items():
                if number is None:
                    assert row[header] == "", (header, row)
                else:
                    assert float(row[header]) == number, (header, row, number)


def markdown_rows(md: str, first_column: str) -> list[dict[str, str]]:
    """The rows of the markdown table whose header starts with `first_column`, as {column: cell}."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)))
    return rows


@pytest.mark.parametrize("command", ["plan", "inspect", "eval"])
def test_vs_fp16_kv_is_the_size_fraction_everywhere(capsys, tiny_gguf, tiny_bundle, text_file, command):
    """"vs fp16 KV" is bytes over fp16 KV's (xquant-4 well under 1), "compression" its inverse (eval said
    "size vs fp16"; bench's "vs fp16 KV" was the compression factor: tests/test_bench.py)."""
    code, md, err = run(capsys, *format_args(command, tiny_gguf, tiny_bundle, text_file), "--format", "md")
    assert code == 0, err
    rows = {r.get("cache", r.get("method")): r for r in markdown_rows(md, "method" if command == "eval" else "cache")}
    row = rows["xquant-4"]
    assert float(row["vs fp16 KV"]) < 0.5, row
    if "compression" in row:
        assert float(row["compression"].rstrip("x")) == pytest.approx(1 / float(row["vs fp16 KV"]), rel=0.01)
    assert "size vs fp16" not in md


def markdown_cell_counts(md: str) -> list[list[int]]:
    """For each markdown table of `md`, the number of cells of each of its lines (a `\\|` is no cell border)."""
    tables: list[list[int]] = []
    previous = ""
    for line in md.splitlines():
        if line.startswith("|"):
            if not previous.startswith("|"):
                tables.append([])
            tables[-1].append(len(re.split(r"(?<!\\)\|", line)) - 2)
        previous = line
    return tables


def test_markdown_tables_stay_tables_with_a_pipe_in_a_cell(capsys, tiny_bundle):
    """inspect's `max |X|` header split its cell: the table had 8 header cells over a 6-cell separator."""
    code, md, err = run(capsys, "inspect", str(tiny_bundle), "--format", "md")
    assert code == 0, err
    assert r"| layer | max \|X\| | top ch |" in md, md
    counts = markdown_cell_counts(md)
    assert len(counts) == 2 and all(len(set(c)) == 1 for c in counts), counts


# ----------------------------------------------------------------------------- download progress

FAKE_HUB = """
import sys
import time

import huggingface_hub
from huggingface_hub.utils import tqdm

def snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):  # a download, as the hub draws it
    for _ in tqdm(range(3), desc="Fetching xq-fake files"):
        time.sleep(0.01)
    return sys.argv[1]

huggingface_hub.snapshot_download = snapshot_download
from xqcli.cli import main

sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("command", [["generate", "xq-test/fake", "-p", "hi", "-n", "1", "-c", "kv"],
                                     ["eval", "xq-test/fake", "--seq-len", "16", "--methods", "kv"]])
def test_download_bars_on_a_terminal_only(monkeypatch, tiny_bundle, text_file, command):
    argv = [sys.executable, "-c", FAKE_HUB, str(tiny_bundle), *command]
    if command[0] == "eval":
        argv += ["--text", str(text_file)]
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    env = {"HF_HUB_OFFLINE": "0"}
    code, shown, _ = on_pty(argv, stream="stderr", env=env)
    assert code == 0, shown
    assert "Fetching xq-fake files" in shown and "3/3" in shown
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Fetching" not in proc.stderr and "3/3" not in proc.stderr


# ----------------------------------------------------------------------------- eval on a plain install


def test_eval_without_gensim_uses_the_builtin_text(capsys, monkeypatch, tiny_gguf):
    import xqcli.texts as texts

    find_spec = texts.importlib.util.find_spec
    monkeypatch.setattr(texts.importlib.util, "find_spec", lambda name, *a: None if name == "gensim" else
                        find_spec(name, *a))
    texts.wiki_text.cache_clear()
    code, out, err = run(capsys, "eval", tiny_gguf, "--seq-len", "32", "--max-tokens", "64", "--methods", "kv",
                         "--json")
    assert code == 0, err
    assert json.loads(out)["text"] == "builtin" and "builtin text" in err and "gensim" in err
    code, _, err = run(capsys, "eval", tiny_gguf, "--text", "wiki", "--methods", "kv")
    assert code == 6
    line = one_error_line(err)
    assert "pip install --no-deps gensim==4.4.0" in line and "--text builtin" in line


def test_eval_default_is_wiki_where_gensim_is_installed():
    from xqcli.texts import builtin_text, default_text, has_gensim_texts

    assert default_text() == ("wiki" if has_gensim_texts() else "builtin")
    assert len(builtin_text()) > 100_000

