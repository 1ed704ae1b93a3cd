"""`xq convert` on real SmolLM2 (GGUF, HF folder, HF id from an offline hub cache) and hub failures.

Bundles are float32 here so that their logits must equal the source model's; calibration uses few
tokens to keep the suite short (the statistics are checked on tiny models in test_bundle.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import assets
import pytest
import torch

from xqcli.bundle.format import open_bundle
from xqcli.convert.calibrate import capture_inputs
from xqcli.cli import main
from xqcli.convert.pipeline import convert
from xqcli.load import load

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CALIB_TOKENS = 128


def fake_hub(monkeypatch, root: Path, repo_id: str, files: dict[str, Path | str]) -> Path:
    """An HF hub cache with one snapshot (`refs/main` -> COMMIT), used by snapshot_download offline.

    `files` maps names to a file to link to, or to text. huggingface_hub reads its cache location when
    imported, so both the environment and the loaded constant are pointed at `root`.
    """
    import huggingface_hub.constants

    snap = root / f"models--{repo_id.replace('/', '--')}" / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(COMMIT)
    for name, content in files.items():
        if isinstance(content, Path):
            (snap / name).symlink_to(content)
        else:
            (snap / name).write_text(content)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return snap


def assert_same_logits(bundle: Path, reference) -> None:
    model = load(bundle, dtype="float32").model
    tokens = torch.randint(0, reference.config.vocab_size, (1, 48))
    assert (model(tokens) - reference(tokens)).abs().max() <= 1e-4


@pytest.fixture(scope="module")
def smol_bundle(smollm2_dir, tmp_path_factory) -> Path:
    return convert(smollm2_dir, tmp_path_factory.mktemp("smol") / "smol-xq", dtype="float32",
                   calib_tokens=CALIB_TOKENS)


# ------------------------------------------------------------------------------ three sources


@pytest.mark.slow
def test_folder_bundle(smol_bundle, smollm2):
    b = open_bundle(smol_bundle, verify=True)
    assert b.manifest["source"]["kind"] == "folder" and b.has_projections
    assert_same_logits(smol_bundle, smollm2)


@pytest.mark.slow
def test_gguf_bundle(smollm2, tmp_path):
    out = convert(assets.smollm2_gguf(), tmp_path / "g", dtype="float32", calib_tokens=CALIB_TOKENS)
    src = open_bundle(out).manifest["source"]
    assert src["kind"] == "gguf" and src["sha256"] == assets.SMOLLM2_SHA256
    assert_same_logits(out, smollm2)
    shutil.rmtree(out)


@pytest.mark.slow
def test_hub_id_bundle(smollm2, smollm2_dir, tmp_path, monkeypatch):
    names = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "generation_config.json")
    fake_hub(monkeypatch, tmp_path / "hub", "HuggingFaceTB/SmolLM2-135M-Instruct",
             {n: smollm2_dir / n for n in names})
    monkeypatch.chdir(tmp_path)
    out = convert("HuggingFaceTB/SmolLM2-135M-Instruct", dtype="float32", calib_tokens=CALIB_TOKENS)
    assert out == tmp_path / "SmolLM2-135M-Instruct-xq"  # the documented default
    src = open_bundle(out).manifest["source"]
    assert src == {"kind": "hub", "id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": COMMIT}
    assert_same_logits(out, smollm2)
    shutil.rmtree(out)


# ------------------------------------------------------------------------------ the projections


@pytest.mark.slow
def test_projections_reproduce_kv_on_real_activations(smol_bundle):
    """X·U_k·M_k = X·W_kᵀ, X·U_v·M_v = X·W_vᵀ, X·U_kv·U_kvᵀ·W_kv = X·W_kv: every layer, fp32."""
    from xqcli.load import model_projections
    from xqcli.tokenizer import Tokenizer

    loaded = load(smol_bundle, dtype="float32")
    model = loaded.model
    tokens = Tokenizer.from_folder(smol_bundle).encode("The quick brown fox jumps over the lazy dog. " * 12,
                                                       add_special_tokens=False)
    xs = capture_inputs(model, tokens)
    with torch.inference_mode():
        for layer, x, p in zip(model.layers, xs, model_projections(model, loaded.artifacts)):
            a = layer.self_attn
            w_kv = torch.cat([a.k_proj.weight, a.v_proj.weight])
            assert ((x @ p.k.u) @ p.k.m - x @ a.k_proj.weight.T).abs().max() <= 1e-4
            assert ((x @ p.v.u) @ p.v.m - x @ a.v_proj.weight.T).abs().max() <= 1e-4
            assert ((x @ p.kv.u) @ p.kv.u.T @ w_kv.T - x @ w_kv.T).abs().max() <= 1e-4
            for u in (p.k.u, p.v.u, p.kv.u):
                assert (u.T @ u - torch.eye(u.shape[1])).abs().max() <= 1e-5


# ------------------------------------------------------------------------------ commands on a bundle


@pytest.mark.slow
def test_eval_from_bundle_matches_source(smol_bundle, smollm2_dir, capsys):
    args = ["--text", "news", "--max-tokens", "256", "--seq-len", "256", "-m", "kv,xquant-3", "--json"]
    rows = {}
    for name, target in (("bundle", smol_bundle), ("source", smollm2_dir)):
        assert main(["eval", str(target), *args]) == 0
        rows[name] = json.loads(capsys.readouterr().out)["rows"]
    assert rows["bundle"] == rows["source"]
    assert main(["eval", str(smol_bundle), *args, "--calibrated"]) == 0
    cal = json.loads(capsys.readouterr().out)["rows"]
    assert [r["method"] for r in cal] == ["kv", "xquant-3", "xquant-3 (cal)"] and cal[:2] == rows["bundle"]
    assert main(["eval", str(smollm2_dir), *args, "--calibrated"]) == 2
    assert "needs a bundle" in capsys.readouterr().err


@pytest.mark.slow
def test_inspect(smol_bundle, capsys):
    assert main(["inspect", str(smol_bundle), "--verify", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verified"] and report["latents"] and report["config"]["num_hidden_layers"] == 30
    kinds = {r["kind"]: r for r in report["bytes_per_token"]}
    assert kinds["kv"]["bytes_per_token"] == 30 * 2 * 192 * 2 and kinds["xquant-4"]["vs_fp16_kv"] < 0.3
    layers = report["calibration"]["layers"]
    assert len(layers) == 30 and all(0 < r["latent"]["k_channel0_energy"] < 1 for r in layers)
    assert main(["inspect", str(smol_bundle)]) == 0
    out = capsys.readouterr().out
    assert "schema 1" in out and "ch0" in out and "xquant-cl-2" in out


# ------------------------------------------------------------------------------ hub failures (fast)


def test_missing_id_offline(tmp_path, monkeypatch, capsys):
    fake_hub(monkeypatch, tmp_path / "hub", "someone/other", {"config.json": "{}"})
    monkeypatch.chdir(tmp_path)
    code = main(["convert", "nobody/missing-model"])
    err = capsys.readouterr().err
    assert code == 5 and "HF_HUB_OFFLINE" in err and "nobody/missing-model" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "missing-model-xq").exists()


def test_unsupported_architecture_before_weights(tmp_path, monkeypatch, capsys):
    """A gpt2 config is refused from config.json alone: the fake cache has no weights to fetch."""
    fake_hub(monkeypatch, tmp_path / "hub", "openai-community/gpt2",
             {"config.json": json.dumps({"model_type": "gpt2", "n_embd": 768, "n_layer": 12})})
    monkeypatch.chdir(tmp_path)
    code = main(["convert", "openai-community/gpt2"])
    err = capsys.readouterr().err
    assert code == 3 and "gpt2" in err and "not supported" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub"]


def test_missing_tokenizer_is_found_before_any_work(tmp_path, monkeypatch, capsys):
    """A folder without tokenizer.json failed after the weights and the calibration, naming the temp folder."""
    from xqcli.convert import pipeline

    def no_weights(*_args, **_kw):
        raise AssertionError("weights read before the tokenizer was checked")

    monkeypatch.setattr(pipeline, "read_safetensors", no_weights)
    src = assets.tiny_hf("llama")  # config.json and weights, no tokenizer
    code = main(["convert", str(src), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the "reading SRC" progress line
    assert code == 3 and last.startswith("error:") and "Traceback" not in err, err
    assert f"{src} has no tokenizer.json" in last and ".tmp-" not in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["convert", "generate"])
def test_tokenizer_of_another_model_is_refused_before_any_work(command, smollm2_dir, tmp_path, monkeypatch,
                                                                capsys):
    """SmolLM2's tokenizer (49,152 ids) beside tiny weights (256 rows): convert failed in calibration with
    "internal error: IndexError" (exit 1) after writing the weights; both commands now name the mismatch (exit 3)."""
    from xqcli.convert import pipeline

    def no_weights(*_args, **_kw):
        raise AssertionError("weights read before the tokenizer was checked")

    monkeypatch.setattr(pipeline, "read_safetensors", no_weights)
    src = tmp_path / "mixed"
    shutil.copytree(assets.tiny_hf("llama"), src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(smollm2_dir / name, src / name)
    out = tmp_path / "out"
    args = [command, str(src), *(["-o", str(out)] if command == "convert" else ["-p", "Hi", "-n", "2"])]
    code = main(args)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after convert's "reading SRC" progress line
    assert code == 3 and "Traceback" not in err and last.startswith(f"error: {src}: "), err
    assert "has 49,152 tokens" in last and "vocab_size is 256" in last and "tokenizer.json" in last, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed"]  # no bundle, no temporary folder


def test_a_target_force_cannot_replace_never_suggests_force(tmp_path, capsys):
    """`-o` a user's folder said "pass --force to replace it", and --force was then refused."""
    src = assets.tiny_gguf("llama")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    plain = tmp_path / "plain.txt"
    plain.write_text("keep")
    for out, fix in ((mine, "empty that folder"), (plain, "move that file away"), (src, "choose another --out")):
        for force in ([], ["--force"]):
            code = main(["convert", str(src), "-o", str(out), *force])
            err = capsys.readouterr().err
            assert code == 2 and "pass --force" not in err and fix in err, (out, force, err)
    assert (mine / "notes.txt").read_text() == "keep" and plain.read_text() == "keep" and src.stat().st_size > 0
    empty = tmp_path / "empty"
    empty.mkdir()  # a folder --force may replace: the hint names it
    assert main(["convert", str(src), "-o", str(empty)]) == 2 and "pass --force" in capsys.readouterr().err


def test_two_different_revisions_are_refused(tmp_path, monkeypatch, capsys):
    """`org/name@main --revision v2` silently used v2; the same revision given twice is fine."""
    from xqcli.sources.hub import resolve

    tiny = assets.tiny_hf("llama")
    fake_hub(monkeypatch, tmp_path / "hub", "someone/tiny",
             {n: tiny / n for n in ("config.json", "model.safetensors")})
    for args in (["convert", "-o", str(tmp_path / "out")], ["generate", "-p", "hi"]):
        code = main([args[0], "someone/tiny@main", *args[1:], "--revision", "v2"])
        err = capsys.readouterr().err
        assert code == 2 and "'main'" in err and "'v2'" in err and "once" in err, err
    assert resolve("someone/tiny@main", revision="main").revision == COMMIT


@pytest.mark.parametrize("files", [{}, {"config.json"}, {"config.json", "model.safetensors.index.json"}])
@pytest.mark.parametrize("command", ["convert", "generate"])
def test_partial_snapshot_offline_is_not_in_the_cache(files, command, tmp_path, monkeypatch, capsys):
    """A snapshot cut short (no config.json, no weights, a shard missing) gave exit 2 or 3 with a path and no hint."""
    tiny = assets.tiny_hf("llama")
    index = json.dumps({"weight_map": {"model.embed_tokens.weight": "model-00001-of-00001.safetensors"}})
    content = {"config.json": tiny / "config.json", "model.safetensors.index.json": index}
    fake_hub(monkeypatch, tmp_path / "hub", "someone/tiny", {n: content[n] for n in files})
    missing = ("config.json" if not files else "model-00001-of-00001.safetensors" if len(files) > 1
               else "model.safetensors")
    args = ["-o", str(tmp_path / "out")] if command == "convert" else ["-p", "hi"]
    code = main([command, "someone/tiny", *args])
    err = capsys.readouterr().err
    assert code == 5 and err.startswith("error: someone/tiny: ") and len(err.strip().splitlines()) == 1, err
    assert missing in err and "HF_HUB_OFFLINE is set" in err and "download it where the hub is reachable" in err, err


@pytest.mark.parametrize("command", ["convert", "generate"])
def test_offline_error_names_the_flag_that_caused_it(command, tmp_path, monkeypatch, capsys):
    """Only --offline was given, and the error blamed HF_HUB_OFFLINE."""
    fake_hub(monkeypatch, tmp_path / "hub", "someone/other", {"config.json": "{}"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    args = ["-o", str(tmp_path / "out")] if command == "convert" else ["-p", "hi"]
    code = main([command, "nobody/missing-model", *args, "--offline"])
    err = capsys.readouterr().err
    assert code == 5 and "--offline was given" in err and "HF_HUB_OFFLINE" not in err, err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main([command, "nobody/missing-model", *args])  # the variable alone, after a command with the flag
    err = capsys.readouterr().err
    assert code == 5 and "HF_HUB_OFFLINE is set" in err and "--offline" not in err, err
