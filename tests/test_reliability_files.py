"""Reliability of the file side (issue 14): what `xq convert` may replace, interrupted converts, what a
bundle may make xq read, manifest bounds and integrity, non-finite weights, misplaced projections, I/O
errors and their exit codes, and bounded chat-template rendering. Each test is a case a hostile user
tried; each failed before the fix."""
# ruff: noqa: F811  (the shared fixtures are imported from test_bundle and requested by name)

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import assets
import pytest
import torch
from test_bundle import bundle_copy, edit_manifest, gqa_bundle, gqa_dir, run_cli  # noqa: F401

from xqcli.bundle.format import MANIFEST, file_entry, open_bundle
from xqcli.config import ModelConfig
from xqcli.convert.pipeline import convert
from xqcli.errors import BundleError, InputError, ModelError, WeightsError
from xqcli.load import load
from xqcli.tokenizer import Tokenizer


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging the suite) when the block runs longer than `seconds`."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def relist(bundle: Path, name: str) -> None:
    """Put `name` (size and sha256 as it is now) into the manifest's file list."""
    entry = file_entry(bundle, name)
    edit_manifest(bundle, lambda m: m.update(files=[f for f in m["files"] if f["path"] != name] + [entry]))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def dead_pid() -> int:
    """The id of a process that has just ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ------------------------------------------------------------------ 1. --force replaces only bundles


def test_force_refuses_a_folder_that_is_not_a_bundle(gqa_dir, tmp_path, capsys):
    out = tmp_path / "userdata"
    out.mkdir()
    (out / "thesis.txt").write_text("draft")
    code, _, err = run_cli(capsys, "convert", str(gqa_dir), "-o", str(out), "--force")
    assert code == 2 and "not an xq bundle" in err and (out / "thesis.txt").read_text() == "draft"
    plain = tmp_path / "notes.txt"
    plain.write_text("keep")
    code, _, err = run_cli(capsys, "convert", str(gqa_dir), "-o", str(plain), "--force")
    assert code == 2 and plain.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "userdata"]


def test_force_never_replaces_the_source(gqa_bundle, tmp_path, capsys):
    gguf = Path(shutil.copy(assets.tiny_gguf("llama"), tmp_path / "m.gguf"))
    code, _, err = run_cli(capsys, "convert", str(gguf), "-o", str(gguf), "--force")
    assert code == 2 and "source" in err and gguf.stat().st_size > 0
    src = Path(shutil.copytree(gqa_bundle, tmp_path / "parent" / "src"))  # a bundle: replaceable otherwise
    link = tmp_path / "link"
    link.symlink_to(src)
    for target in (src, link, tmp_path / "parent"):
        code, _, err = run_cli(capsys, "convert", str(src), "-o", str(target), "--force")
        assert code == 2 and "source" in err, (target, err)
    assert open_bundle(src, verify=True)


def test_force_replaces_a_bundle_or_an_empty_folder(gqa_dir, gqa_bundle, tmp_path, capsys):
    old = Path(shutil.copytree(gqa_bundle, tmp_path / "b"))
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (old, empty):
        code, _, err = run_cli(capsys, "convert", str(gqa_dir), "-o", str(out), "--force", "--calib-tokens", "16")
        assert code == 0, err
        assert open_bundle(out, verify=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "empty"]


# ------------------------------------------------------------------ 3. what a bundle may make xq read


@pytest.mark.parametrize("name", ["chat_template.jinja", "chat_template.json", "special_tokens_map.json"])
def test_unlisted_tokenizer_file_refused(bundle_copy, tmp_path, name, capsys):
    outside = tmp_path / f"outside-{name}"
    outside.write_text('{"chat_template": "x"}' if name.endswith(".json") else "x")
    (bundle_copy / name).symlink_to(outside)
    code, _, err = run_cli(capsys, "inspect", str(bundle_copy))
    assert code == 4 and name in err and "not listed" in err
    (bundle_copy / name).unlink()
    shutil.copy(outside, bundle_copy / name)  # a plain file is refused too: it is not hashed
    with pytest.raises(BundleError, match="not listed"):
        load(bundle_copy)


@pytest.mark.parametrize("section,key,value", [
    ("cache_defaults", "window", 10**9),
    ("cache_defaults", "window", 513),  # > max_position_embeddings (512)
    ("cache_defaults", "group_size", 2**40),
    ("cache_defaults", "base_layers", 2**40),
    ("cache_defaults", "clip", 1),  # not a documented setting
    ("rotation", "seed", 2**64),
    ("rotation", "seed", -1),
])
def test_manifest_values_are_bounded(bundle_copy, section, key, value, capsys):
    edit_manifest(bundle_copy, lambda m: m[section].update({key: value}))
    code, _, err = run_cli(capsys, "inspect", str(bundle_copy))
    assert code == 4 and section in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("edit", [
    lambda m: m["cache_defaults"].update(cache="kivi-4"),
    lambda m: m["cache_defaults"].update(window=64),
    lambda m: m["cache_defaults"].update(group_size=64),
    lambda m: m["rotation"].update(kind="random"),
    lambda m: m["rotation"].update(seed=7),
    lambda m: m.update(dtype="bfloat16"),
    lambda m: m["source"].update(id="/elsewhere"),
    lambda m: m.pop("manifest_sha256"),
])
def test_verify_covers_the_manifest(bundle_copy, edit, capsys):
    open_bundle(bundle_copy, verify=True)
    edit_manifest(bundle_copy, edit)
    open_bundle(bundle_copy)  # a valid manifest still opens: only --verify can tell it changed
    code, _, err = run_cli(capsys, "inspect", str(bundle_copy), "--verify")
    assert code == 4 and MANIFEST in err and len(err.strip().splitlines()) == 1


def test_verify_ignores_formatting_of_the_manifest(bundle_copy):
    m = json.loads((bundle_copy / MANIFEST).read_text())
    (bundle_copy / MANIFEST).write_text(json.dumps(m, indent=7))
    open_bundle(bundle_copy, verify=True)


def test_fifos_are_refused(bundle_copy, capsys):
    (bundle_copy / "calibration.json").unlink()
    os.mkfifo(bundle_copy / "calibration.json")
    with deadline(30):
        with pytest.raises(BundleError, match="not a regular file"):
            open_bundle(bundle_copy)
        (bundle_copy / MANIFEST).unlink()
        os.mkfifo(bundle_copy / MANIFEST)
        code, _, err = run_cli(capsys, "inspect", str(bundle_copy))
    assert code == 4 and "not a regular file" in err


# ------------------------------------------------------------------ 4. interrupted converts


# argv: model, output, marker file, SIGHUP's disposition at start ("default": a terminal session; "ignore":
# under nohup). Set explicitly: a child inherits an ignored SIGHUP from a suite run under nohup.
_SLOW_CONVERT = """
import signal, sys, time
import xqcli.convert.pipeline as pipeline
signal.signal(signal.SIGHUP, signal.SIG_IGN if sys.argv[4] == "ignore" else signal.SIG_DFL)
def slow(*args, **kwargs):
    open(sys.argv[3], "w").close()
    time.sleep(120)
pipeline.calibrate = slow
from xqcli.cli import main
sys.exit(main(["convert", sys.argv[1], "-o", sys.argv[2], "--calib-tokens", "16"]))
"""


def start_slow_convert(model: Path, out_parent: Path, marker: Path, sighup: str = "default") -> subprocess.Popen:
    """A convert child that stops in calibration; returns once its temporary folder exists."""
    child = subprocess.Popen([sys.executable, "-c", _SLOW_CONVERT, str(model), str(out_parent / "b"), str(marker),
                              sighup], stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not marker.exists():
        assert child.poll() is None and time.monotonic() - t0 < 120, "the convert never reached calibration"
        time.sleep(0.1)
    assert [p.name for p in out_parent.iterdir()]  # its temporary folder exists now
    return child


def assert_interrupted_cleanly(child: subprocess.Popen, out_parent: Path) -> None:
    try:
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130 and "interrupted" in err, err
    assert list(out_parent.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_terminated_convert_leaves_nothing(gqa_dir, tmp_path, signum):
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    child = start_slow_convert(gqa_dir, out_parent, tmp_path / "calibrating")
    child.send_signal(signum)
    assert_interrupted_cleanly(child, out_parent)


def test_convert_under_nohup_ignores_sighup(gqa_dir, tmp_path):
    """`nohup xq convert` keeps converting when the terminal closes; SIGTERM still stops it cleanly."""
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    child = start_slow_convert(gqa_dir, out_parent, tmp_path / "calibrating", sighup="ignore")
    child.send_signal(signal.SIGHUP)
    time.sleep(2)
    assert child.poll() is None, "SIGHUP stopped a convert that ignores it"
    child.send_signal(signal.SIGTERM)
    assert_interrupted_cleanly(child, out_parent)


def test_stale_temporary_folders_are_removed(gqa_dir, gqa_bundle, tmp_path):
    from xqcli.convert.pipeline import temp_name

    dead, alive = dead_pid(), os.getpid()
    stale = tmp_path / temp_name("b", "tmp", dead)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    busy = tmp_path / temp_name("other", "tmp", alive)
    busy.mkdir()
    orphan_old = Path(shutil.copytree(gqa_bundle, tmp_path / temp_name("c", "old", dead)))  # c itself is gone
    convert(gqa_dir, tmp_path / "b", calib_tokens=16)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["b", busy.name, "c"]), names
    assert open_bundle(tmp_path / "c", verify=True) and not orphan_old.exists()


def test_second_interrupt_during_cleanup_is_deferred(gqa_dir, tmp_path, monkeypatch):
    """A Ctrl-C while the temporary folder is being deleted does not stop the deletion half-way."""
    from xqcli.convert import pipeline

    real_rmtree = shutil.rmtree
    calls = []

    def rmtree_interrupted(path, *args, **kwargs):
        calls.append(path)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler would run here
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(pipeline, "calibrate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.setattr(shutil, "rmtree", rmtree_interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(gqa_dir, tmp_path / "b", calib_tokens=16)
    assert calls and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ 6. non-finite and misplaced tensors


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_refused(gqa_dir, tmp_path, bad, capsys):
    from safetensors.torch import load_file

    folder = Path(shutil.copytree(gqa_dir, tmp_path / "src"))
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = bad
    save_tensors(folder / "model.safetensors", tensors)
    with pytest.raises(WeightsError, match="model.layers.1.mlp.up_proj.weight"):
        load(folder)
    code, _, err = run_cli(capsys, "convert", str(folder), "-o", str(tmp_path / "b"))
    assert code == 3 and "not finite" in err and not (tmp_path / "b").exists()


def test_float16_overflow_refused(gqa_dir, tmp_path):
    from safetensors.torch import load_file

    folder = Path(shutil.copytree(gqa_dir, tmp_path / "src"))
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.norm.weight"][5] = 1e6  # finite in float32, inf in float16
    save_tensors(folder / "model.safetensors", tensors)
    with pytest.raises(WeightsError, match="model.norm.weight .float16"):
        convert(folder, tmp_path / "b", dtype="float16")


def test_non_finite_projections_refused(bundle_copy):
    from safetensors.torch import load_file

    path = bundle_copy / "projections.safetensors"
    tensors = load_file(str(path))
    tensors["layers.1.v.m"][0, 0] = float("nan")
    save_tensors(path, tensors)
    relist(bundle_copy, path.name)
    with pytest.raises(BundleError, match="layers.1.v.m"):
        load(bundle_copy)


def test_projections_of_another_layer_refused(bundle_copy, capsys):
    from safetensors.torch import load_file

    path = bundle_copy / "projections.safetensors"
    tensors = load_file(str(path))
    swapped = {k.replace("layers.0.", "layers.X.").replace("layers.1.", "layers.0.").replace("layers.X.", "layers.1."): v
               for k, v in tensors.items()}
    save_tensors(path, swapped)
    relist(bundle_copy, path.name)
    with pytest.raises(BundleError, match="layer 0"):
        load(bundle_copy)
    code, _, err = run_cli(capsys, "generate", str(bundle_copy), "-p", "hi", "-n", "2")
    assert code == 4 and "layer 0" in err


def test_one_changed_projection_entry_refused(bundle_copy):
    from safetensors.torch import load_file

    path = bundle_copy / "projections.safetensors"
    tensors = load_file(str(path))
    tensors["layers.1.kv.u"][7, 3] += 0.05
    save_tensors(path, tensors)
    relist(bundle_copy, path.name)
    with pytest.raises(BundleError, match="layer 1"):
        load(bundle_copy)


# ------------------------------------------------------------------ 7. exit codes for input and I/O


def test_unwritable_output_found_before_the_work(gqa_dir, tmp_path, monkeypatch, capsys):
    from xqcli.convert import pipeline

    monkeypatch.setattr(pipeline, "_read_source", lambda *a: pytest.fail("the source was read"))
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(capsys, "convert", str(gqa_dir), "-o", str(tmp_path / "file" / "b"))
    assert code == 2 and str(tmp_path / "file") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_no_space_found_before_the_work(gqa_dir, tmp_path, monkeypatch, capsys):
    from xqcli.convert import pipeline

    monkeypatch.setattr(pipeline, "calibrate", lambda *a, **k: pytest.fail("calibration ran"))
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**6, 10**6 - 1000, 1000))
    code, _, err = run_cli(capsys, "convert", str(gqa_dir), "-o", str(tmp_path / "b"))
    assert code == 7 and "does not fit" in err and "1000 B" in err.replace(",", "")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("err_no,code", [(errno.ENOSPC, 7), (errno.EROFS, 2)])
def test_write_errors_during_convert(gqa_dir, tmp_path, monkeypatch, capsys, err_no, code):
    from xqcli.convert import pipeline

    def failing_write(tensors, path):
        raise OSError(err_no, os.strerror(err_no), str(path))

    monkeypatch.setattr(pipeline, "save_safetensors", failing_write)
    got, _, err = run_cli(capsys, "convert", str(gqa_dir), "-o", str(tmp_path / "b"))
    assert got == code and os.strerror(err_no) in err and "safetensors" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_rope_scaling_not_an_object(key):
    raw = assets.tiny_config("llama") | {key: "linear"}
    with pytest.raises(ModelError, match=key) as e:
        ModelConfig.from_dict(raw)
    assert e.value.exit_code == 3


def test_non_utf8_chat_template(gqa_dir, bundle_copy, tmp_path):
    folder = Path(shutil.copytree(gqa_dir, tmp_path / "src"))
    (folder / "chat_template.jinja").write_bytes(b"{{ '\xff' }}")
    with pytest.raises(ModelError, match="UTF-8") as e:
        Tokenizer.from_folder(folder)
    assert e.value.exit_code == 3
    shutil.copy(folder / "chat_template.jinja", bundle_copy)
    relist(bundle_copy, "chat_template.jinja")
    with pytest.raises(BundleError, match="UTF-8"):
        load(bundle_copy).tokenizer()


# ------------------------------------------------------------------ 9. bounded rendering


def tokenizer_with_template(folder: Path, tmp_path: Path, template: str) -> Tokenizer:
    (tmp_path / "t.jinja").write_text(template)
    tok = Tokenizer.from_folder(folder)
    tok.use_chat_template_file(tmp_path / "t.jinja")
    return tok


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}",
    "{{ 10 ** 1000000000 }}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
], ids=["nested-loops", "big-output", "huge-power", "recursion"])
def test_chat_template_rendering_is_bounded(gqa_dir, tmp_path, template):
    tok = tokenizer_with_template(gqa_dir, tmp_path, template)
    with deadline(60), pytest.raises(InputError, match="chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_ordinary_templates_render_as_before(gqa_dir, tmp_path):
    template = ("{% for m in messages %}{% for c in m['content'] %}{{ c }}{% endfor %}{{ loop.length }}"
                "{% if loop.last %}!{% endif %}{% endfor %}{{ 'ab' * 3 }}{{ 2 ** 10 }}")
    tok = tokenizer_with_template(gqa_dir, tmp_path, template)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "user", "content": "yo"}])
    assert text == "hi2yo2!ababab1024"


# ------------------------------------------------------------------ 12. exit codes of inspect and tokenizer


def test_inspect_missing_path_is_bad_input(tmp_path, capsys):
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "nowhere"))
    assert code == 2 and "does not exist" in err


def test_damaged_tokenizer_in_bundle_is_a_bundle_error(bundle_copy, capsys):
    path = bundle_copy / "tokenizer.json"
    data = bytearray(path.read_bytes())
    data[0:1] = b"x"  # same size: only --verify or parsing sees it
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="tokenizer.json"):
        load(bundle_copy).tokenizer()
    code, _, err = run_cli(capsys, "generate", str(bundle_copy), "-p", "hi", "-n", "2")
    assert code == 4 and "tokenizer.json" in err
