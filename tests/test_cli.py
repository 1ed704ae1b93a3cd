"""The `xq` command: startup cost, version/help, commands as plain functions, the JSON envelope and schemas,
doctor, and one-line errors with documented exit codes."""

from __future__ import annotations

import importlib
import inspect
import json
import shutil
import subprocess
import sys

import pytest
from schemas import ENVELOPE, assert_valid, errors

from xqcli import __version__
from xqcli.cli import app, main


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *needles: str) -> None:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, err)


def test_import_is_light():
    code = ("import sys, xqcli.cli; heavy = [m for m in ('torch', 'triton', 'huggingface_hub', 'transformers') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_version_and_help(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("xq 0.") and "2508.10395" in out
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for cmd in ("convert", "chat", "generate", "eval", "bench", "plan", "inspect", "doctor", "serve"):
        assert cmd in out
    for args, flag in (([], "--version"), (["generate"], "--json"), (["convert"], "--force")):
        code, out, _ = run(capsys, *args, "--help")  # flags take no value: no `<bool>` beside them
        assert code == 0 and flag in out and "--help" in out and "<bool>" not in out


def test_commands_are_module_level_functions(capsys):
    """Each command is a plain function of an `xqcli.commands` module, importable and registered under its name."""
    registered = {c.name: c.callback for c in app.registered_commands}
    assert set(registered) == {"convert", "chat", "generate", "eval", "bench", "plan", "inspect", "doctor",
                               "serve"}
    for name, fn in registered.items():
        module = importlib.import_module(fn.__module__)
        assert fn.__module__.startswith("xqcli.commands.") and getattr(module, fn.__name__) is fn, name
        assert fn.__qualname__ == fn.__name__, name  # not a closure
    params = inspect.signature(registered["generate"]).parameters
    assert params["context"].default is None and params["as_json"].default is False
    code, out, _ = run(capsys, "eval", "--help")
    assert code == 0 and "--methods" in out


def test_commands_do_not_import_each_other():
    """Shared options come from `xqcli.commands._options`, never from another command."""
    from pathlib import Path

    import xqcli.commands as pkg

    for path in Path(pkg.__path__[0]).glob("*.py"):
        text = path.read_text()
        for other in ("bench", "chat", "convert", "doctor", "eval_cmd", "generate", "inspect_cmd", "plan"):
            if other != path.stem:
                assert f"xqcli.commands.{other}" not in text and f"from xqcli.commands import {other}" not in text, \
                    (path.name, other)


def test_schema_validator_catches_violations():
    assert errors({"a": 1}, "convert")[-1] == "$: Additional properties are not allowed ('a' was unexpected)"
    env = {"schema_version": 1, "tool": "xq convert", "xq_version": __version__, "bundle": "b", "total_bytes": 3}
    assert errors(env | {"files": [{"path": "x", "size": 3, "sha256": "0" * 64}]}, "convert") == []
    bad = errors(env | {"total_bytes": 3.0, "files": [{"path": "x", "size": True, "sha256": "z"}]}, "convert")
    assert bad == ["$.files[0].sha256: 'z' does not match '^[0-9a-f]{64}$'",
                   "$.files[0].size: True is not of type 'integer'", "$.total_bytes: 3.0 is not of type 'integer'"]
    with pytest.raises(AssertionError, match="'bundle' is a required property"):
        assert_valid({"schema_version": 1}, "convert")


def test_doctor_json(capsys):
    code, out, _ = run(capsys, "doctor", "--json")
    report = json.loads(out)
    assert code == 0 and report["torch"] and "cache_dir" in report["hf"] and "triton_kernels" in report
    assert_valid(report, "doctor")


def test_doctor_says_when_kernels_are_off(capsys, monkeypatch):
    monkeypatch.setenv("XQ_KERNELS", "off")
    code, out, _ = run(capsys, "doctor", "--json")
    assert code == 0 and json.loads(out)["triton_kernels"].startswith("off (XQ_KERNELS=off)")
    monkeypatch.setenv("XQ_KERNELS", "fast")
    code, out, _ = run(capsys, "doctor", "--json")
    assert code == 0 and json.loads(out)["triton_kernels"].startswith("invalid: XQ_KERNELS='fast'")


def test_debug_shows_traceback(monkeypatch, capsys):
    monkeypatch.setenv("XQ_DEBUG", "1")
    from xqcli.errors import InputError

    with pytest.raises(InputError):
        main(["generate", "/does/not/exist", "-p", "hi"])


# ----------------------------------------------------------------------------- bad model sources


def test_path_does_not_exist(capsys):
    code, _, err = run(capsys, "generate", "/does/not/exist", "-p", "hi")
    assert code == 2
    assert_one_line_error(err, "/does/not/exist", "does not exist")


def test_folder_without_config(tmp_path, capsys):
    code, _, err = run(capsys, "generate", str(tmp_path), "-p", "hi")
    assert code == 3
    assert_one_line_error(err, "no config.json")


def copy_tiny(tmp_path, kind="llama"):
    import assets

    dst = tmp_path / "m"
    shutil.copytree(assets.tiny_hf(kind), dst)
    return dst


def test_unsupported_model_type(tmp_path, capsys):
    d = copy_tiny(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes(b"not read: the config check comes first")
    code, _, err = run(capsys, "generate", str(d), "-p", "hi")
    assert code == 3
    assert_one_line_error(err, "gpt_neox", "llama, mistral, qwen2")


def test_missing_shard(tmp_path, capsys):
    d = copy_tiny(tmp_path)
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                                            "model.norm.weight": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = run(capsys, "generate", str(d), "-p", "hi")
    assert code == 3
    assert_one_line_error(err, "missing shard", "model-00002-of-00002.safetensors")


def test_truncated_safetensors(tmp_path, capsys):
    d = copy_tiny(tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    code, _, err = run(capsys, "generate", str(d), "-p", "hi")
    assert code == 3
    assert_one_line_error(err, "model.safetensors", "truncated or corrupt")


def test_weights_report_every_bad_key(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from xqcli.errors import WeightsError
    from xqcli.load import load_hf_folder

    d = copy_tiny(tmp_path)
    sd = load_file(d / "model.safetensors")
    sd.pop("model.norm.weight")
    sd["model.extra.weight"] = torch.zeros(2)
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(WeightsError) as e:
        load_hf_folder(d)
    msg = str(e.value)
    assert "1 missing: model.norm.weight" in msg and "1 unexpected: model.extra.weight" in msg
    assert "1 mis-shaped: model.layers.0.mlp.up_proj.weight" in msg


def test_corrupt_gguf(tmp_path, capsys):
    f = tmp_path / "bad.gguf"
    f.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    code, _, err = run(capsys, "generate", str(f), "-p", "hi")
    assert code == 3
    assert_one_line_error(err, "bad.gguf")


def test_not_a_gguf_file(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    code, _, err = run(capsys, "generate", str(f), "-p", "hi")
    assert code == 2
    assert_one_line_error(err, "not a .gguf")


def test_generate_needs_one_prompt(capsys):
    code, _, err = run(capsys, "generate", "x")
    assert code == 2
    assert_one_line_error(err, "--prompt")


# ----------------------------------------------------------------------------- plan and eval inputs


def test_plan_numbers(capsys):
    code, out, _ = run(capsys, "plan", "--shape", "llama-3.1-8b", "--json", "-c", "kv,xquant-4,xquant-3,xquant-2")
    assert_valid(json.loads(out), "plan")
    rows = {r["kind"]: r["bytes_per_token"] for r in json.loads(out)["rows"]}
    assert code == 0 and rows == {"kv": 131072, "xquant-4": 34816, "xquant-3": 26624, "xquant-2": 18432}
    code, out, _ = run(capsys, "plan", "--shape", "llama-2-7b", "--json", "-c", "xquant-4,xquant-cl-2", "--budget", "24GiB")
    assert_valid(json.loads(out), "plan")
    rows = {r["kind"]: r for r in json.loads(out)["rows"]}
    assert rows["xquant-4"]["bytes_per_token"] == 69632 and rows["xquant-cl-2"]["bytes_per_token"] == 39936
    assert rows["xquant-4"]["max_context"] > 100_000


@pytest.mark.parametrize("args,code,needle", [
    (["plan", "--shape", "llama-3.1-8b", "-c", "xquant-5"], 2, "bits must be one of 2, 3, 4, 8"),
    (["plan", "--shape", "llama-3.1-8b", "-c", "zquant-4"], 2, "unknown cache kind"),
    (["plan", "--shape", "llama-3.1-8b", "--group-size", "0"], 2, "group size must be >= 1"),
    (["plan", "--shape", "llama-3.1-8b", "--budget", "8GiB"], 7, "not larger than the weights"),
    (["plan", "--shape", "llama-3.1-8b", "--budget", "lots"], 2, "cannot read the memory size"),
    (["plan", "--shape", "gpt-9"], 2, "not a named shape"),
])
def test_plan_bad_input(capsys, args, code, needle):
    got, _, err = run(capsys, *args)
    assert got == code
    assert_one_line_error(err, needle)


@pytest.mark.slow
@pytest.mark.parametrize("args,code,needle", [
    (["--methods", "kv,xquant-9"], 2, "bits must be one of 2, 3, 4, 8"),
    (["--methods", "nope"], 2, "unknown cache kind"),
    (["--group-size", "0"], 2, "group size must be >= 1"),
    (["--text", "EMPTY"], 2, "empty"),
    (["--text", "SHORT"], 2, "fewer than one window"),
])
def test_eval_bad_input(capsys, tmp_path, smollm2_dir, args, code, needle):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("Just a few words here.")
    args = [a.replace("EMPTY", str(tmp_path / "empty.txt")).replace("SHORT", str(tmp_path / "short.txt")) for a in args]
    got, _, err = run(capsys, "eval", str(smollm2_dir), "--seq-len", "64", *args)
    assert got == code
    assert_one_line_error(err, needle)


@pytest.mark.slow
def test_eval_json_rows(capsys, smollm2_dir):
    code, out, _ = run(capsys, "eval", str(smollm2_dir), "--text", "news", "--seq-len", "128", "--max-tokens", "256",
                       "--methods", "kv,kivi-4,xquant-4,xquant-cl-4,xquant-2", "--json")
    assert code == 0
    assert_valid(json.loads(out), "eval")
    rows = {r["method"]: r for r in json.loads(out)["rows"]}
    assert rows["kv"]["delta_ppl"] == 0 and rows["kv"]["kl"] == 0 and rows["kv"]["top1"] == 1
    assert rows["kv"]["scored_tokens"] == 2 * 127
    for m in ("kivi-4", "xquant-4", "xquant-cl-4", "xquant-2"):
        assert rows[m]["kl"] > 0 and rows[m]["compression"] > 3
    assert rows["xquant-2"]["kl"] > rows["xquant-4"]["kl"]


def test_usage_error_is_one_line(capsys):
    code, _, err = run(capsys, "plan", "--bogus")
    assert code == 2
    assert_one_line_error(err, "No such option: --bogus", "xq plan --help")


# ----------------------------------------------------------------------------- the JSON envelope


@pytest.fixture(scope="module")
def tiny_gguf():
    import assets

    return str(assets.tiny_gguf("llama"))


@pytest.fixture(scope="module")
def tiny_bundle(tiny_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "b"
    assert main(["convert", tiny_gguf, "-o", str(out), "--dtype", "float32", "--calib-tokens", "32"]) == 0
    return out


def json_output(name: str, tiny_gguf: str, tiny_bundle, tmp_path) -> list[str]:
    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat and looked at the dog, who looked back at the cat. " * 3)
    return {
        "doctor": ["doctor", "--json"],
        "plan": ["plan", "--shape", "smollm2-135m", "-c", "kv,xquant-4", "--json"],
        "generate": ["generate", tiny_gguf, "-p", "the cat", "-n", "3", "--json"],
        "eval": ["eval", tiny_gguf, "--text", str(text), "--seq-len", "32", "--methods", "kv,xquant-4", "--json"],
        "bench": ["bench", tiny_gguf, "--context", "32", "--cache", "kv", "--decode-tokens", "1", "--reps", "1",
                  "--warmup", "0", "--device", "cpu", "--format", "json"],
        "convert": ["convert", tiny_gguf, "-o", str(tmp_path / "b"), "--calib-tokens", "32", "--json"],
        "inspect": ["inspect", str(tiny_bundle), "--verify", "--json"],
    }[name]


@pytest.mark.parametrize("name", ["doctor", "plan", "generate", "eval", "bench", "convert", "inspect"])
def test_every_json_output_has_the_envelope(capsys, tiny_gguf, tiny_bundle, tmp_path, name):
    """schema_version, tool and xq_version come first in every --json object, which matches its schema."""
    code, out, err = run(capsys, *json_output(name, tiny_gguf, tiny_bundle, tmp_path))
    assert code == 0, err
    obj = json.loads(out)
    assert tuple(obj)[:3] == ENVELOPE
    assert obj["schema_version"] == 1 and obj["tool"] == f"xq {name}" and obj["xq_version"] == __version__
    assert_valid(obj, name)


def test_inspect_json_keeps_the_bundle_versions_apart(capsys, tiny_bundle):
    code, out, _ = run(capsys, "inspect", str(tiny_bundle), "--json")
    manifest = json.loads((tiny_bundle / "xq.json").read_text())
    obj = json.loads(out)
    assert code == 0 and obj["bundle_schema_version"] == manifest["schema_version"]
    assert obj["bundle_xq_version"] == manifest["xq_version"] and "schema" not in obj
