"""Bundles on tiny models: round trip, sharding, defensive opening (tampering, paths, schema), a manifest
fuzz, atomic writes, and the calibration record (statistics, per-layer clips, versions, progress)."""

from __future__ import annotations

import copy
import json
import random
import shutil
import signal
from pathlib import Path

import assets
import pytest
import torch

from xqcli.bundle.format import MANIFEST, open_bundle
from xqcli.cache.spec import CacheSpec
from xqcli.load import make_cache
from xqcli.cli import main
from xqcli.convert.pipeline import convert
from xqcli.errors import BundleError, InputError
from xqcli.load import load
from xqcli.load import load_hf_folder


def tiny_folder(root: Path, kind: str, **overrides) -> Path:
    """A tiny random model folder with the byte-level tokenizer of the tiny GGUF (calibration needs one)."""
    from safetensors.torch import save_file

    from xqcli.sources.gguf import load_gguf, write_tokenizer_files

    cfg = assets.tiny_config(kind) | overrides
    folder = root / f"tiny-{kind}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(assets.tiny_tensors(cfg, 11), str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer_files(load_gguf(assets.tiny_gguf("llama")), folder)
    return folder


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory) -> Path:
    """One kv head: 2·d_kv = 32 < d = 64, so the caches use SVD latents and the bundle has projections."""
    return tiny_folder(tmp_path_factory.mktemp("src"), "llama", num_key_value_heads=1)


@pytest.fixture(scope="module")
def gqa_bundle(gqa_dir, tmp_path_factory) -> Path:
    return convert(gqa_dir, tmp_path_factory.mktemp("out") / "b", dtype="float32", calib_tokens=64)


@pytest.fixture
def bundle_copy(gqa_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(gqa_bundle, tmp_path / "copy"))


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def edit_manifest(bundle: Path, change) -> None:
    m = json.loads((bundle / MANIFEST).read_text())
    change(m)
    (bundle / MANIFEST).write_text(json.dumps(m))


# ------------------------------------------------------------------------------------ round trip


def test_bundle_round_trip(gqa_dir, gqa_bundle):
    """Same logits as the source, projections installed from the file, identical xquant logits."""
    names = {p.name for p in gqa_bundle.iterdir()}
    assert {"xq.json", "config.json", "model.safetensors", "projections.safetensors", "calibration.json",
            "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    b = open_bundle(gqa_bundle, verify=True)
    assert b.manifest["source"]["kind"] == "folder" and b.dtype == "float32"
    loaded = load(gqa_bundle, dtype="float32")
    assert loaded.source.kind == "bundle" and loaded.bundle is not None
    stored = b.projections()
    assert all(torch.equal(a.k.u, s.k.u) and torch.equal(a.v.m, s.v.m)
               for a, s in zip(loaded.artifacts.factors, stored))
    src = load_hf_folder(gqa_dir)
    tokens = torch.randint(0, 256, (2, 40))
    assert torch.equal(loaded.model(tokens), src(tokens))
    for name in ("xquant-4", "xquant-cl-3"):
        spec = CacheSpec.parse(name, group_size=16)
        outs = [loaded.model(tokens, loaded.make_cache(spec, 2, 40)), src(tokens, make_cache(src, spec, 2, 40))]
        assert (outs[0] - outs[1]).abs().max() <= 1e-5
    cfg = json.loads((gqa_bundle / "config.json").read_text())
    assert cfg["xquant"] == {"manifest": "xq.json", "schema_version": 1} and cfg["torch_dtype"] == "float32"


def test_bf16_sharded_bundle(gqa_dir, tmp_path):
    """bf16 weights in several shards with an HF index; the model loads with the rounded values."""
    out = convert(gqa_dir, tmp_path / "sharded", shard_size=40_000, calib_tokens=32)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    source = load_hf_folder(gqa_dir).state_dict()
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in source.values())
    loaded = load(out, dtype="float32")
    want = {k: v.to(torch.bfloat16).float() for k, v in source.items()}
    assert all(torch.equal(v, want[k]) for k, v in loaded.model.state_dict().items())
    from safetensors import safe_open

    with safe_open(str(out / shards[0]), "pt") as f:
        assert f.metadata()["format"] == "pt" and "xq_version" in f.metadata()


def test_mha_bundle_has_no_projections(tmp_path):
    out = convert(tiny_folder(tmp_path, "mha"), tmp_path / "mha-xq", calib_tokens=32)
    b = open_bundle(out)
    assert b.manifest["projections"] is None and not (out / "projections.safetensors").exists()
    assert all(layer["latent"] is None for layer in b.calibration()["layers"])
    assert not load(out).bundle.has_projections


# ------------------------------------------------------------------------------------ bad bundles


def test_flipped_byte_fails_verify(bundle_copy, capsys):
    path = bundle_copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    open_bundle(bundle_copy)  # sizes still match: only hashing sees it
    code, _, err = run_cli(capsys, "inspect", str(bundle_copy), "--verify")
    assert code == 4 and "model.safetensors" in err and "sha256" in err and len(err.strip().splitlines()) == 1


def test_manifest_path_outside_bundle(bundle_copy, capsys):
    (bundle_copy.parent / "outside").write_text("x")
    entry = {"path": "../outside", "size": 1, "sha256": "0" * 64}
    edit_manifest(bundle_copy, lambda m: m["files"].append(entry))
    code, _, err = run_cli(capsys, "inspect", str(bundle_copy))
    assert code == 4 and "../outside" in err and "plain file name" in err


def test_symlink_escaping_bundle(bundle_copy, tmp_path):
    tok = bundle_copy / "tokenizer.json"
    outside = tmp_path / "elsewhere.json"
    shutil.move(tok, outside)
    tok.symlink_to(outside)
    with pytest.raises(BundleError, match="outside the bundle"):
        open_bundle(bundle_copy)


def test_newer_schema(bundle_copy, capsys):
    edit_manifest(bundle_copy, lambda m: m.update(schema_version=2))
    code, _, err = run_cli(capsys, "inspect", str(bundle_copy))
    assert code == 4 and "schema 2" in err and "schema 1" in err and "upgrade xq" in err


def test_truncated_and_missing_files(bundle_copy):
    with open(bundle_copy / "calibration.json", "ab") as f:
        f.write(b" ")
    with pytest.raises(BundleError, match="calibration.json.*manifest says"):
        open_bundle(bundle_copy)
    (bundle_copy / "calibration.json").unlink()
    with pytest.raises(BundleError, match="calibration.json: listed in xq.json but missing"):
        open_bundle(bundle_copy)


def test_projection_shapes_checked(bundle_copy):
    from xqcli.bundle.format import file_entry
    from xqcli.convert.pipeline import save_safetensors

    save_safetensors({"layers.0.k.u": torch.zeros(3, 3)}, bundle_copy / "projections.safetensors")
    entry = file_entry(bundle_copy, "projections.safetensors")
    edit_manifest(bundle_copy, lambda m: m.update(files=[entry if f["path"] == entry["path"] else f
                                                         for f in m["files"]]))
    with pytest.raises(BundleError, match="do not match config.json"):
        open_bundle(bundle_copy)


def test_not_a_bundle(gqa_dir, capsys):
    code, _, err = run_cli(capsys, "inspect", str(gqa_dir))
    assert code == 2 and "not an xq bundle" in err  # never a bundle: bad input, not a corrupt bundle (4)


def test_folder_without_xq_json_is_bad_input_and_a_damaged_one_corrupt(gqa_dir, bundle_copy, tmp_path, capsys):
    """A folder without xq.json was never a bundle (2, naming `xq convert`); a damaged xq.json is corrupt (4, with
    the fix); a model folder without xq.json still loads as a model folder."""
    for folder, fix in ((gqa_dir, f"convert it first, xq convert {gqa_dir}"), (tmp_path, "xq convert MODEL")):
        code, out, err = run_cli(capsys, "inspect", str(folder))
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
        assert f"{folder} is not an xq bundle (no xq.json)" in err and fix in err, err
    (bundle_copy / MANIFEST).write_text('{"schema_version": 1, "files": [')
    code, _, err = run_cli(capsys, "inspect", str(bundle_copy))
    assert code == 4 and "xq.json: unreadable JSON" in err and "convert the model again" in err, err
    assert load(gqa_dir).bundle is None
    code, out, err = run_cli(capsys, "generate", str(gqa_dir), "-p", "the cat", "-n", "2", "-c", "kv")
    assert code == 0, err


@pytest.mark.parametrize("damage,needle,fix", [
    ("config", "'config' does not match config.json", "config.json was edited after conversion; convert the model"),
    ("header", "projections.safetensors: unreadable safetensors", "the file is damaged; convert the model again"),
])
def test_damaged_bundle_errors_name_the_fix(bundle_copy, capsys, damage, needle, fix):
    """These bundle errors named no fix (the sha256 and missing-file ones did)."""
    from xqcli.bundle.format import PROJECTIONS, file_entry

    if damage == "config":  # edited, with the manifest's size and sha256 kept in step
        cfg = json.loads((bundle_copy / "config.json").read_text())
        (bundle_copy / "config.json").write_text(json.dumps(cfg | {"rms_norm_eps": 0.5}))
        edit_manifest(bundle_copy, lambda m: m.update(files=[file_entry(bundle_copy, f["path"]) for f in m["files"]]))
    else:  # the same size (the manifest's check passes), a header length beyond the file
        path = bundle_copy / PROJECTIONS
        data = bytearray(path.read_bytes())
        data[:8] = (len(data) * 2).to_bytes(8, "little")
        path.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "inspect", str(bundle_copy))
    assert code == 4 and len(err.strip().splitlines()) == 1 and needle in err and fix in err, err


_WEIRD = [None, True, False, -1, 0, 1, 2**70, 10**400, -1e308, 1e308, float("nan"), float("inf"), "", "x",
          "../outside", "/etc/passwd", "a/b", "..", ".", "\x00", "\ud800", "x" * 5000, "xq.json",
          "config.json", "~/x", "C:\\x", [], {}, [1, "a"], {"path": "config.json"}, [[[[[]]]]]]


def _weird(rng: random.Random):
    return copy.deepcopy(rng.choice(_WEIRD))  # fresh lists and dicts: mutations must not alias


def _mutate(rng: random.Random, node, root: bool = False):
    """One random JSON-level change somewhere in `node` (returns the new node); the root stays an object
    and half the changes go inside its file list, the part that names paths."""
    if isinstance(node, dict) and node and (root or rng.random() < 0.7):
        if root and isinstance(node.get("files"), list) and rng.random() < 0.5:
            node["files"] = _mutate(rng, node["files"])
            return node
        key = rng.choice(sorted(node))
        op = rng.random()
        if op < 0.25:
            del node[key]
        elif op < 0.5:
            node[key] = _weird(rng)
        elif op < 0.6:
            node[rng.choice(["extra", "\x00", "files", "path", key + "_"])] = _weird(rng)
        else:
            node[key] = _mutate(rng, node[key])
        return node
    if isinstance(node, list) and node and rng.random() < 0.7:
        i = rng.randrange(len(node))
        op = rng.random()
        if op < 0.2:
            del node[i]
        elif op < 0.35:
            node.append(json.loads(json.dumps(node[i], allow_nan=True)))
        elif op < 0.5:
            node[i] = _weird(rng)
        else:
            node[i] = _mutate(rng, node[i])
        return node
    if isinstance(node, int) and not isinstance(node, bool) and rng.random() < 0.5:
        return rng.choice([node + 1, node - 1, -node, node * 2**40])
    if isinstance(node, str) and rng.random() < 0.5:
        return rng.choice([node[::-1], node + "x", node.upper(), "", "../" + node, node[:-1]])
    return _weird(rng)


def test_fuzzed_manifests(bundle_copy):
    """500 seeded mutations of a valid manifest: each one loads or raises BundleError, quickly."""
    base = (bundle_copy / MANIFEST).read_text()
    rng = random.Random(1234)

    def timeout(*_):
        raise TimeoutError("open_bundle took more than 120 s on fuzzed manifests")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(120)
    outcomes = {"ok": 0, "error": 0}
    try:
        for i in range(500):
            m = json.loads(base)
            for _ in range(rng.randint(1, 3)):
                m = _mutate(rng, m, root=True)
            data = json.dumps(m).encode()
            if i % 25 == 0:
                data = data[: rng.randrange(len(data))]  # truncated JSON
            elif i % 25 == 1:
                data = b"\xff" + data  # not UTF-8
            (bundle_copy / MANIFEST).write_bytes(data)
            try:
                open_bundle(bundle_copy, verify=i % 10 == 0)
                outcomes["ok"] += 1
            except BundleError:
                outcomes["error"] += 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert outcomes["error"] > 400, outcomes


# ------------------------------------------------------------------------------------ writing safely


def test_existing_target_and_force(gqa_dir, gqa_bundle, tmp_path, capsys):
    out = Path(shutil.copytree(gqa_bundle, tmp_path / "target"))  # --force replaces bundles only
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "convert", str(gqa_dir), "-o", str(out), "--calib-tokens", "32")
    assert code == 2 and "already exists" in err and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"
    code, stdout, _ = run_cli(capsys, "convert", str(gqa_dir), "-o", str(out), "--calib-tokens", "32",
                              "--force")
    assert code == 0 and str(out) in stdout
    assert not (out / "keep.txt").exists() and open_bundle(out, verify=True)
    assert leftovers(tmp_path, "target") == []


def test_interrupted_convert_leaves_nothing(gqa_dir, tmp_path, capsys, monkeypatch):
    import xqcli.convert.pipeline

    real = xqcli.convert.pipeline.save_safetensors

    def interrupted(tensors, path):
        real(tensors, path)  # the first file is written, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(xqcli.convert.pipeline, "save_safetensors", interrupted)
    code, _, _ = run_cli(capsys, "convert", str(gqa_dir), "-o", str(tmp_path / "b"), "--calib-tokens", "32")
    assert code == 130  # Typer turns Ctrl-C into exit 130 itself
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_interrupted_force_keeps_old_bundle(gqa_dir, gqa_bundle, tmp_path, monkeypatch):
    import xqcli.convert.pipeline

    out = Path(shutil.copytree(gqa_bundle, tmp_path / "b"))
    monkeypatch.setattr(xqcli.convert.pipeline, "calibrate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        convert(gqa_dir, out, force=True, calib_tokens=32)
    assert open_bundle(out, verify=True).dtype == "float32" and leftovers(tmp_path, "b") == []


def test_bad_convert_arguments(gqa_dir, tmp_path):
    with pytest.raises(InputError, match="dtype"):
        convert(gqa_dir, tmp_path / "x", dtype="int8")
    with pytest.raises(InputError, match="--calib"):
        convert(gqa_dir, tmp_path / "x", calib=tmp_path / "missing.txt")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ calibration


def test_calibration_record(gqa_bundle):
    cal = open_bundle(gqa_bundle).calibration()
    assert cal["version"] == 2 and cal["tokens"] == 64 and len(cal["layers"]) == 2 and cal["latents"]
    assert "bit_plans" not in cal
    for rec in cal["layers"]:
        assert set(rec) == {"layer", "x", "latent", "clip", "kv_error"}
        assert 0 < rec["latent"]["k_channel0_energy"] < 1
        assert set(rec["clip"]) == {"xquant", "kivi"} and set(rec["clip"]["xquant"]) == {"2", "3", "4", "8"}
        errs = rec["kv_error"]["xquant"]
        assert errs["2"] > errs["3"] > errs["4"] > errs["8"] > 0
    assert "most_sensitive_layers" not in json.loads((gqa_bundle / MANIFEST).read_text())["calibration"]


def test_calibration_progress_counts_every_layer(tiny_models):
    from xqcli.convert.calibrate import calibrate

    model = tiny_models["qwen2"]
    n = model.config.num_hidden_layers
    calls: list[tuple[int, int]] = []
    calibrate(model, list(range(32)), text="t", progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, n) for i in range(n + 1)]


def test_calibration_bar_on_a_terminal_only(gqa_dir, tmp_path, capsys):
    """Calibration shows a per-layer bar with an ETA on a terminal's stderr, and nothing on a pipe."""
    import os
    import re
    import subprocess
    import sys

    code, _, err = run_cli(capsys, "convert", str(gqa_dir), "-o", str(tmp_path / "piped"), "--calib-tokens", "32")
    assert code == 0 and "calibrating" in err and "layers" not in err
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "xqcli", "convert", str(gqa_dir), "-o", str(tmp_path / "tty"),
                             "--calib-tokens", "32"], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            env=dict(os.environ, TERM="xterm-256color", COLUMNS="120"))
    os.close(slave)
    raw = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        raw += chunk
    os.close(master)
    assert proc.wait(120) == 0, raw
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw.decode("utf-8", "replace"))
    assert re.search(r"calibration .*\b[0-2]/2 layers -?[0-9:-]+", text), text


def test_calibration_versions(bundle_copy, capsys):
    """A version-1 record (no "version"; bit plans and sensitivities of the removed +mix) still opens and
    inspects; a newer version asks for a newer xq; a broken field is refused before any use."""
    import xqcli.bundle.format as fmt

    path = bundle_copy / "calibration.json"
    cal = json.loads(path.read_text())
    old = copy.deepcopy(cal)
    del old["version"]
    old["bit_plans"] = {"3": [4, 2]}
    for rec in old["layers"]:
        rec |= {"sensitivity": 0.1, "attn_error": {"xquant": {"2": 0.3, "3": 0.1, "4": 0.05, "8": 0.0}}}
    path.write_text(json.dumps(old))
    edit_manifest(bundle_copy, lambda m: m.update(files=[fmt.file_entry(bundle_copy, f["path"])
                                                         for f in m["files"]]))
    code, out, err = run_cli(capsys, "inspect", str(bundle_copy))
    assert code == 0 and "K/V err" in out, err
    with pytest.raises(BundleError, match="newer than this xq") as e:
        fmt._check_calibration(path, cal | {"version": 3}, 2)
    assert e.value.hint == "upgrade xq"
    for broken in ({"version": "2"}, {"version": 0}, {"layers": cal["layers"][:1]}):
        with pytest.raises(BundleError, match="malformed calibration"):
            fmt._check_calibration(path, cal | broken, 2)
    bad = copy.deepcopy(cal)
    bad["layers"][1]["kv_error"]["kivi"]["3"] = -1.0
    with pytest.raises(BundleError, match="malformed calibration"):
        fmt._check_calibration(path, bad, 2)


def test_per_layer_clips(gqa_bundle):
    """Per-layer clips equal to the global clip give the same cache; a wrong count is refused."""
    loaded = load(gqa_bundle, dtype="float32")
    model, tokens = loaded.model, torch.randint(0, 256, (1, 48))

    def logits(**kw) -> torch.Tensor:
        spec = CacheSpec.parse("xquant-2", group_size=16, window=0, **kw)
        return model(tokens, loaded.make_cache(spec, 1, 48))

    ref = logits()
    assert torch.equal(logits(clips=(1.0, 1.0)), ref)
    assert torch.equal(logits(clips=(0.7, 0.7)), logits(clip=0.7))
    assert not torch.equal(logits(clips=(1.0, 0.7)), ref)
    assert CacheSpec.parse("xquant-2", clips=(1.0, 1.0)).name == "xquant-2 (cal)"
    with pytest.raises(InputError, match="2-layer"):
        loaded.make_cache(CacheSpec.parse("kivi-2", clips=(0.9,)), 1, 8)
    with pytest.raises(InputError, match="clip ratio"):
        CacheSpec.parse("kivi-2", clips=(0.9, 1.5))


# ------------------------------------------------------------------------------------ beyond the paper


def test_rotation_recorded_and_checked(bundle_copy, capsys):
    from xqcli.load import load

    m = json.loads((bundle_copy / MANIFEST).read_text())
    assert m["rotation"]["kind"] == "hadamard"
    assert load(bundle_copy).artifacts.rotation == ("hadamard", 0)
    edit_manifest(bundle_copy, lambda m: m["rotation"].update(widths=[999, 1, 2]))
    code, _, err = run_cli(capsys, "inspect", str(bundle_copy))
    assert code == 4 and "does not match the model" in err and len(err.strip().splitlines()) == 1
    edit_manifest(bundle_copy, lambda m: m["rotation"].update(kind="spiral"))
    code, _, err = run_cli(capsys, "inspect", str(bundle_copy))
    assert code == 4 and "rotation" in err


def test_unknown_rotation_refused(gqa_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "convert", str(gqa_dir), "-o", str(tmp_path / "b"), "--rotation", "spiral")
    assert code == 2 and "unknown rotation" in err and not (tmp_path / "b").exists()
