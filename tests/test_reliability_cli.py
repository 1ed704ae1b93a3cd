"""Reliability of the CLI and the engine under bad input and faults (issue 14): chat never ends on a failed
/save, /load or undecodable line; cache memory is estimated before it is allocated; every integer option is
bounded; invalid UTF-8 is bad input; a closed or broken stdout ends quietly; contexts beyond the model's
trained positions need a flag; conflicting cache options are refused. Each case exits with its README code."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xqcli.cli import main

ROOT = Path(__file__).resolve().parents[1]
HUGE = "99999999999999999999"  # above 2**63


@pytest.fixture(scope="module")
def tiny_gguf() -> str:
    import assets

    return str(assets.tiny_gguf("llama"))


@pytest.fixture(scope="module")
def tiny_model():
    import assets

    from xqcli.load import load_hf_folder

    return load_hf_folder(assets.tiny_hf("llama"))


@pytest.fixture(scope="module")
def latent_model():
    """A tiny llama with one kv head: 2 * d_kv < d, so xquant caches SVD latents."""
    import assets

    from xqcli.config import ModelConfig
    from xqcli.load import build_model

    cfg = assets.tiny_config("llama") | {"num_key_value_heads": 1}
    return build_model(ModelConfig.from_dict(cfg), assets.tiny_tensors(cfg, seed=7))


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str, *needles: str) -> str:
    """The whole stderr is one `error:` line (no blank line before it, no traceback, no C++ frames)."""
    assert err.startswith("error:"), repr(err)
    assert len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)
    return err


def xq(*args: str, stdin: bytes | None = None, env: dict[str, str] | None = None, timeout: float = 300
       ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xqcli", *args], input=stdin, capture_output=True, cwd=ROOT,
                          env=dict(os.environ, **(env or {})), timeout=timeout)


# ------------------------------------------------------------------ 2. chat never ends on a failed command


def chat_script(monkeypatch, *lines: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))


def chat_args(tiny_gguf: str, *extra: str) -> list[str]:
    return ["chat", tiny_gguf, "--cache", "kv", "--temperature", "0", "-n", "3", "--context", "256", *extra]


def test_chat_save_into_a_missing_or_bad_place_keeps_the_conversation(capsys, monkeypatch, tiny_gguf, tmp_path):
    chat_script(monkeypatch, "Hi", f"/save {tmp_path}/nodir/x.safetensors", f"/save {tmp_path}",
                f"/load {tmp_path}", f"/save {tmp_path}/ok.safetensors", "/exit")
    code, out, err = run(capsys, *chat_args(tiny_gguf))
    assert code == 0, err
    assert "error: cannot write the session file" in err and "nodir" in err and "does not exist" in err
    assert f"error: {tmp_path} is a folder" in err
    assert err.count(f"{tmp_path} is a folder") == 2 and "does not exist\n" not in err.split("nodir")[-1]
    assert (tmp_path / "ok.safetensors").is_file() and "saved" in err
    assert not list(tmp_path.glob("**/*.tmp"))


def saved_session(tmp_path: Path, tiny_gguf: str, capsys, monkeypatch) -> Path:
    path = tmp_path / "s.safetensors"
    chat_script(monkeypatch, "Hi", f"/save {path}", "/exit")
    code, _, err = run(capsys, *chat_args(tiny_gguf))
    assert code == 0 and path.is_file(), err
    return path


def rewrite_session(src: Path, dst: Path, *, raw=None, edit=None) -> Path:
    """A copy of a session file with its `session` metadata edited as text (`raw`) or as a dict (`edit`)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), "pt") as f:
        header = dict(f.metadata())
    tensors = load_file(str(src))
    if edit is not None:
        meta = json.loads(header["session"])
        edit(meta, tensors)
        header["session"] = json.dumps(meta)
    else:
        header["session"] = raw(header["session"])
    save_file(tensors, str(dst), metadata=header)
    return dst


@pytest.mark.parametrize("case", ["messages-not-a-list", "message-not-a-dict", "content-not-text", "deep-nesting",
                                  "id-beyond-vocab"])
def test_chat_load_of_a_malformed_session_keeps_the_conversation(capsys, monkeypatch, tiny_gguf, tmp_path, case):
    good = saved_session(tmp_path, tiny_gguf, capsys, monkeypatch)
    bad = tmp_path / "bad.safetensors"

    def ids_beyond_vocab(meta, tensors):
        meta["ids"][-1] = 10**6
        tensors["ids"][-1] = 10**6

    if case == "deep-nesting":
        deep = "[" * 100_000 + "]" * 100_000
        rewrite_session(good, bad, raw=lambda text: text.replace('"messages": [', f'"messages": [{deep}, ', 1))
    else:
        edits = {"messages-not-a-list": lambda m, t: m.update(messages="hello"),
                 "message-not-a-dict": lambda m, t: m.update(messages=[["user", "hi"]]),
                 "content-not-text": lambda m, t: m.update(messages=[{"role": "user", "content": {"a": 1}}]),
                 "id-beyond-vocab": ids_beyond_vocab}
        rewrite_session(good, bad, edit=edits[case])
    chat_script(monkeypatch, "Hi", f"/load {bad}", "and then?", "/exit")
    code, out, err = run(capsys, *chat_args(tiny_gguf))
    assert code == 0, err
    assert f"error: {bad}" in err, err
    assert err.count("3 tokens,") == 2  # both answers came


def test_chat_undecodable_line_keeps_the_conversation(capsys, monkeypatch, tiny_gguf):
    chat_script(monkeypatch, "Hi", "caf\udce9 au lait", "and then?", "/exit")  # how Python hands over bad bytes
    code, _, err = run(capsys, *chat_args(tiny_gguf))
    assert code == 0, err
    assert "error: this line is not valid UTF-8" in err and err.count("3 tokens,") == 2


def test_chat_undecodable_line_in_a_real_pipe(tiny_gguf):
    """A UTF-8 locale reads stdin strictly: the bad line is reported, the next one answered."""
    p = xq(*chat_args(tiny_gguf), stdin=b"caf\xe9 au lait\nHi\n/exit\n", env={"LC_ALL": "C.UTF-8"})
    err = p.stderr.decode()
    assert p.returncode == 0, err
    assert "error: this line is not valid UTF-8" in err and "3 tokens," in err and "Traceback" not in err


def test_session_of_another_cache_kind_is_blamed_on_the_kind(latent_model, tmp_path):
    from xqcli.engine import Engine, collect, load_session, save_session
    from xqcli.errors import InputError

    xq4 = Engine(latent_model, None, "xquant-4", context=64)
    collect(xq4.generate([5, 6, 7], max_tokens=2))
    save_session(tmp_path / "s.safetensors", xq4, [], "tiny")
    kv = Engine(latent_model, None, "kv", context=64)
    with pytest.raises(InputError) as e:
        load_session(tmp_path / "s.safetensors", kv, "tiny")
    assert "holds a xquant-4 cache, this session uses kv" in str(e.value) and "projections" not in str(e.value)


# --------------------------------------------------------------- 5. memory estimated before it is allocated


def test_window_is_sized_by_the_context(tiny_model):
    from xqcli.cache.spec import CacheSpec
    from xqcli.engine import Engine

    wide = Engine(tiny_model, None, CacheSpec.parse("xquant-4", window=50_000), context=66)
    fits = Engine(tiny_model, None, CacheSpec.parse("xquant-4", window=66), context=66)
    assert wide.cache.allocated().total == fits.cache.allocated().total
    assert wide.spec.window == 66


@pytest.mark.parametrize("where", ["budget", "available"])
def test_cache_memory_refused_before_allocation(tiny_model, monkeypatch, where):
    import xqcli.engine.loop as loop
    from xqcli.errors import ResourceError

    built: list[str] = []
    real = loop.make_cache

    def spy(model, spec, batch, max_len, **kw):
        built.append(str(kw.get("device")))
        return real(model, spec, batch, max_len, **kw)

    monkeypatch.setattr(loop, "make_cache", spy)
    if where == "available":
        monkeypatch.setattr(loop, "available_memory", lambda: 1000)
    with pytest.raises(ResourceError) as e:
        loop.Engine(tiny_model, None, "kv", context=512, budget=1000 if where == "budget" else None)
    msg = str(e.value)
    assert "kv cache for 1 x 512 tokens needs 256.00 KiB" in msg and "1,000 B" in msg, msg
    assert all(d == "meta" for d in built), built  # nothing real was allocated
    assert e.value.exit_code == 7


def test_chat_budget_refuses_the_cache(capsys, monkeypatch, tiny_gguf):
    chat_script(monkeypatch, "/exit")
    code, _, err = run(capsys, *chat_args(tiny_gguf, "--budget", "1KiB"))
    assert code == 7
    one_error_line(err, "needs", "--budget 1.00 KiB")


# ------------------------------------------------------------------------------------ 7. bad input is 2


def test_invalid_utf8_prompt_is_bad_input(capsys, tiny_gguf):
    code, out, err = run(capsys, "generate", tiny_gguf, "-p", "caf\udce9", "-n", "2")
    assert code == 2 and out == ""
    one_error_line(err, "--prompt", "UTF-8")
    p = xq("generate", tiny_gguf, "--prompt-file", "-", "-n", "2", stdin=b"caf\xe9 au lait")
    assert p.returncode == 2, p.stderr
    one_error_line(p.stderr.decode(), "UTF-8")


def test_invalid_utf8_in_argv_from_a_real_process(tiny_gguf):
    p = subprocess.run([os.fsencode(sys.executable), b"-m", b"xqcli", b"generate", os.fsencode(tiny_gguf),
                        b"-p", b"caf\xe9", b"-n", b"2"], capture_output=True, cwd=ROOT, timeout=300)
    assert p.returncode == 2, p.stderr
    one_error_line(p.stderr.decode(), "UTF-8")


@pytest.mark.parametrize("target", ["folder", "missing-parent"])
def test_bench_output_checked_before_the_run(capsys, tiny_gguf, tmp_path, target):
    out = tmp_path if target == "folder" else tmp_path / "nodir" / "r.md"
    code, stdout, err = run(capsys, "bench", tiny_gguf, "--context", "32", "--cache", "kv", "--decode-tokens", "1",
                            "--reps", "1", "--warmup", "0", "--device", "cpu", "--output", str(out))
    assert code == 2 and stdout == ""
    one_error_line(err, "--output")


def test_unknown_device_is_bad_input(capsys, tiny_gguf):
    code, _, err = run(capsys, "generate", tiny_gguf, "-p", "hi", "--device", "tpu")
    assert code == 2
    one_error_line(err, "tpu", "cpu", "cuda")


def test_token_id_beyond_the_vocabulary(tiny_model):
    from xqcli.engine import Engine, collect
    from xqcli.errors import ModelError

    engine = Engine(tiny_model, None, "kv", context=64)
    with pytest.raises(ModelError, match="token id 300 is outside the model's vocabulary of 256"):
        collect(engine.generate([5, 300], max_tokens=2))
    assert collect(engine.generate([5, 6], max_tokens=2))[0]["tokens"]  # the engine still works


# ------------------------------------------------------------------------- 8. every integer is bounded


@pytest.mark.parametrize("args", [
    ["generate", "M", "-p", "hi", "-n", HUGE], ["generate", "M", "-p", "hi", "--window", HUGE],
    ["generate", "M", "-p", "hi", "--top-k", HUGE], ["generate", "M", "-p", "hi", "--seed", HUGE],
    ["generate", "M", "-p", "hi", "--bits", HUGE], ["generate", "M", "-p", "hi", "--context", HUGE],
    ["chat", "M", "-n", HUGE], ["chat", "M", "--window", HUGE], ["chat", "M", "--top-k", "-" + HUGE],
    ["eval", "M", "--seq-len", HUGE], ["eval", "M", "--prefix", HUGE], ["eval", "M", "--max-tokens", HUGE],
    ["eval", "M", "--group-size", HUGE], ["eval", "M", "--window", HUGE],
    ["bench", "M", "--batch", HUGE], ["bench", "M", "--decode-tokens", HUGE], ["bench", "M", "--reps", HUGE],
    ["bench", "M", "--warmup", HUGE],
    ["plan", "--shape", "smollm2-135m", "--group-size", HUGE], ["plan", "--shape", "smollm2-135m",
                                                                "--base-layers", HUGE],
], ids=lambda a: f"{a[0]}{a[-2]}{'-neg' if a[-1].startswith('-') else ''}")
def test_integer_options_are_bounded(capsys, tiny_gguf, args):
    code, out, err = run(capsys, *[tiny_gguf if a == "M" else a for a in args])
    assert code == 2 and out == ""
    one_error_line(err, args[-2].lstrip("-"))


# --------------------------------------------------------------------- 10. closed or broken stdout


def test_broken_pipe_ends_quietly(tiny_gguf):
    """`xq generate ... | head -c 1`: exit 0 and nothing on stderr (README, exit codes)."""
    p = subprocess.Popen([sys.executable, "-m", "xqcli", "generate", tiny_gguf, "-p", "the cat", "-n", "400",
                          "--context", "500", "--cache", "kv"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=ROOT)
    assert p.stdout.read(1)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(300) == 0, err
    assert err == ""


def test_chat_into_a_broken_pipe_ends_quietly(tiny_gguf):
    p = subprocess.Popen([sys.executable, "-m", "xqcli", *chat_args(tiny_gguf)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    p.stdin.write(b"Hi\n" * 50 + b"/exit\n")
    p.stdin.close()
    assert p.stdout.read(1)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(300) == 0, err
    assert "error" not in err and "Exception" not in err


def test_closed_stdout_ends_quietly(tiny_gguf):
    p = subprocess.run(f"exec {sys.executable} -m xqcli generate {tiny_gguf} -p 'the cat' -n 3 >&-", shell=True,
                       capture_output=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    assert b"error" not in p.stderr and b"AttributeError" not in p.stderr


# ------------------------------------------------------------------------------------------ 11. context


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_context_zero_is_refused(capsys, monkeypatch, tiny_gguf, command):
    chat_script(monkeypatch, "/exit")
    args = ["-p", "the cat"] if command == "generate" else []
    code, out, err = run(capsys, command, tiny_gguf, *args, "--context", "0")
    assert code == 2 and out == ""
    one_error_line(err, "--context", "at least")


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_context_beyond_trained_positions_needs_the_flag(capsys, monkeypatch, tiny_gguf, command):
    """The tiny model was trained on 512 positions."""
    args = ["-p", "the cat", "-n", "2"] if command == "generate" else ["--cache", "kv"]
    chat_script(monkeypatch, "/exit")
    code, _, err = run(capsys, command, tiny_gguf, *args, "--context", "1k")
    assert code == 7
    one_error_line(err, "1,024", "512", "--allow-long-context")
    chat_script(monkeypatch, "/exit")
    code, _, err = run(capsys, command, tiny_gguf, *args, "--context", "1k", "--allow-long-context")
    assert code == 0, err


def test_generate_default_context_stays_within_trained_positions(capsys, tiny_gguf):
    code, out, err = run(capsys, "generate", tiny_gguf, "-p", "the cat", "-n", "100000", "--json", "--cache", "kv")
    assert code == 0, err
    obj = json.loads(out)
    assert obj["memory"]["capacity_tokens"] == 512 and obj["finish"] == "context"


def help_text(capsys, command: str) -> str:
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    return " ".join(out.replace("│", " ").split())


def test_context_help_is_right_for_each_command(capsys):
    assert "Default: the prompt plus --max-tokens, at most the model's trained positions" in help_text(
        capsys, "generate")
    assert "Default: the model's trained positions, at most 4096" in help_text(capsys, "chat")


def test_allow_long_context_help_names_the_commands_own_option(capsys):
    """eval has no --context: its --allow-long-context relaxes --seq-len (and passkey --lengths)."""
    text = help_text(capsys, "eval")
    assert "Allow a --seq-len (or passkey --lengths) beyond the model's trained positions" in text
    assert "--context" not in text
    assert "Allow a --context beyond the model's trained positions" in help_text(capsys, "generate")


def test_eval_window_beyond_trained_positions(capsys, tiny_gguf):
    code, _, err = run(capsys, "eval", tiny_gguf, "--text", "news", "--seq-len", "1024", "--methods", "kv")
    assert code == 7
    one_error_line(err, "1,024", "512")


# ---------------------------------------------------------------------------------------- 12. conflicts


@pytest.mark.parametrize("name,bits,needle", [
    ("xquant-4", 2, "xquant-4 names 4 bits but --bits 2"),
    ("kv", 4, "kv takes no bit width"),
    ("xquant-4+rot+rot", None, "+rot given twice"),
    ("xquant-3+rot", 2, "names 3 bits but --bits 2"),
])
def test_conflicting_cache_options(name, bits, needle):
    from xqcli.cache.spec import CacheSpec
    from xqcli.errors import InputError

    with pytest.raises(InputError) as e:
        CacheSpec.parse(name, bits=bits)
    assert needle in str(e.value)


def test_conflicting_cache_options_on_the_command_line(capsys, tiny_gguf):
    for args in (["--cache", "xquant-4", "--bits", "2"], ["--cache", "kv", "--bits", "4"],
                 ["--cache", "xquant-4+rot+rot"]):
        code, out, err = run(capsys, "generate", tiny_gguf, "-p", "the cat", "-n", "2", *args)
        assert code == 2 and out == "", args
        one_error_line(err)


def test_removed_mix_variant_says_so(capsys, tiny_gguf):
    """`+mix` was removed (it lost to uniform bits): naming it is a usage error that says why, not garbage."""
    for argv in (["generate", tiny_gguf, "-p", "the cat", "-n", "2", "--cache", "xquant-3+mix"],
                 ["eval", tiny_gguf, "--text", "news", "--methods", "kv,xquant-2.5+mix"]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == "", argv
        one_error_line(err, "unknown variant +mix", "was removed", "CHANGELOG")
    code, _, err = run(capsys, "convert", tiny_gguf, "--budget-bits", "3")
    assert code == 2 and "--budget-bits" in err


def test_eval_error_has_no_blank_line_before_it(capsys, tiny_gguf):
    code, _, err = run(capsys, "eval", tiny_gguf, "--text", "news", "--seq-len", "64", "--max-tokens", "10",
                       "--methods", "kv")
    assert code == 2
    one_error_line(err, "fewer than one window")


# ------------------------------------------------------------------------------ 13. every error names its fix


def broken_source(kind: str, tmp_path: Path, tiny_gguf: str) -> str:
    """A model source broken one way: a cut GGUF, a file that is no GGUF, a folder without weights."""
    if kind == "cut-gguf":
        (tmp_path / "cut.gguf").write_bytes(Path(tiny_gguf).read_bytes()[:200])
        return str(tmp_path / "cut.gguf")
    if kind == "not-gguf":
        (tmp_path / "fake.gguf").write_bytes(b"not gguf!")
        return str(tmp_path / "fake.gguf")
    if kind == "bad-json":
        (tmp_path / "badjson").mkdir()
        (tmp_path / "badjson" / "config.json").write_text('{"model_type": "llama",')
        return str(tmp_path / "badjson")
    import assets

    (tmp_path / "nowts").mkdir()
    (tmp_path / "nowts" / "config.json").write_text(json.dumps(assets.tiny_config("llama")))
    return str(tmp_path / "nowts")


@pytest.mark.parametrize("kind,code,needles", [
    ("cut-gguf", 3, ["corrupt GGUF header", "download it again"]),
    ("not-gguf", 3, ["not a GGUF file", "pass a .gguf model file"]),
    ("no-weights", 3, ["no model.safetensors", "safetensors weights into it"]),
    ("bad-json", 3, ["not a readable JSON config", "download the model again, or fix its JSON"]),
])
def test_broken_sources_name_the_fix(capsys, tiny_gguf, tmp_path, kind, code, needles):
    got, out, err = run(capsys, "generate", broken_source(kind, tmp_path, tiny_gguf), "-p", "hi", "-n", "1")
    assert got == code and out == ""
    one_error_line(err, *needles)


def test_missing_files_are_named_as_missing(capsys, tiny_gguf, tmp_path):
    """A missing -f or --calib file was blamed on its encoding ("the prompt must be UTF-8 text")."""
    code, _, err = run(capsys, "generate", tiny_gguf, "-f", str(tmp_path / "nope.txt"), "-n", "1")
    assert code == 2 and "UTF-8" not in err
    one_error_line(err, f"the prompt file {tmp_path / 'nope.txt'} does not exist", "check the path")
    code, _, err = run(capsys, "convert", tiny_gguf, "-o", str(tmp_path / "b"), "--calib", str(tmp_path / "nope"))
    assert code == 2 and "UTF-8 text (" not in err and not (tmp_path / "b").exists()
    one_error_line(err, f"--calib {tmp_path / 'nope'}: does not exist", "check the path")
    code, _, err = run(capsys, "convert", tiny_gguf, "-o", str(tmp_path / "b"), "--calib", str(tmp_path))
    assert code == 2 and "UTF-8 text (" not in err and not (tmp_path / "b").exists()
    one_error_line(err, f"--calib {tmp_path}: is a folder", "give a UTF-8 text file")


def test_generate_prompt_filling_the_context_suggests_generates_fixes(capsys, tiny_gguf):
    """generate has no /reset (chat's command): raise --context or shorten the prompt, or pass
    --allow-long-context when the context is already the trained positions."""
    code, out, err = run(capsys, "generate", tiny_gguf, "-p", "hello there my friend", "-n", "8", "--context", "4",
                         "-c", "kv")
    assert code == 7 and out == "" and "/reset" not in err
    one_error_line(err, "leaves no room to answer", "raise --context above", "shorten the prompt")
    code, out, err = run(capsys, "generate", tiny_gguf, "-p", "the cat sat on the mat " * 120, "-n", "1", "-c", "kv")
    assert code == 7 and out == "" and "/reset" not in err
    one_error_line(err, "the model's 512 trained positions", "shorten the prompt", "--allow-long-context")
