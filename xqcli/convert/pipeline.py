"""Convert any model source (HF id, HF folder, `.gguf`) into an xq bundle folder (docs/bundle.md).

The model is built from the weights already cast to the bundle dtype, so the SVD projections and the
calibration describe exactly what a bundle user will run. Everything is written into a temporary folder
beside the target and renamed into place at the end (style Part 4 item 9): a convert that fails or is
interrupted leaves neither a bundle nor a temporary folder, and `force` replaces an old bundle only
once the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xqcli import __version__
from xqcli.bundle.artifacts import Artifacts
from xqcli.bundle.bitplan import attention_errors, bit_plan
from xqcli.bundle.format import (
    CALIBRATION,
    MANIFEST,
    PROJECTIONS,
    SCHEMA_VERSION,
    SIGN_CONVENTION,
    file_entry,
    projection_tensors,
    projections_from_tensors,
    rotation_widths,
)
from xqcli.bundle.projections import layer_projections
from xqcli.bundle.rotation import Rotation
from xqcli.cache.spec import CacheSpec, uses_latents
from xqcli.config import ModelConfig
from xqcli.convert.calibrate import DEFAULT_TOKENS, builtin_text, calibrate
from xqcli.errors import InputError
from xqcli.fileio import write_json
from xqcli.load import build_model
from xqcli.sources.hf import check_model_folder, parse_dtype, read_safetensors, shard_files
from xqcli.sources.hub import ALLOW_PATTERNS, Source, resolve
from xqcli.texts import read_user_text

DEFAULT_SHARD_SIZE = 2 * 10**9
INDEX = "model.safetensors.index.json"
# Tokenizer, template and generation files are copied verbatim from a folder source.
TOKENIZER_FILES = tuple(p for p in ALLOW_PATTERNS if "*" not in p and p not in ("config.json", INDEX))


@dataclass
class _SourceModel:
    raw_config: dict[str, Any]  # config.json as the source has it
    tensors: dict[str, torch.Tensor]
    info: dict[str, Any]  # the manifest's "source"
    write_tokenizer: Callable[[Path], None]


def default_out_dir(src: str) -> Path:
    """`./<name>-xq`: <name> is the folder name, the .gguf file stem, or the repo name of an HF id."""
    p = Path(src).expanduser()
    if p.exists():
        name = p.stem if p.is_file() else p.resolve().name
    else:
        name = src.partition("@")[0].rstrip("/").rsplit("/", 1)[-1]
    return Path.cwd() / f"{name}-xq"


def convert(src: str | Path, out_dir: str | Path | None = None, *, dtype: str | torch.dtype = "bfloat16",
            revision: str | None = None, token: str | None = None, offline: bool | None = None,
            force: bool = False, calib: str | Path | None = None, calib_tokens: int = DEFAULT_TOKENS,
            shard_size: int = DEFAULT_SHARD_SIZE, rotation: str = "hadamard", rotation_seed: int = 0,
            budget_bits: float | None = None, progress: Callable[[str], None] | None = None) -> Path:
    """Write the bundle of `src` and return its folder. `progress` receives one line per stage."""
    say = progress or (lambda _msg: None)
    out_dt = parse_dtype(dtype)
    if shard_size < 1:
        raise InputError(f"shard size must be positive (got {shard_size})")
    if calib_tokens < 16:
        raise InputError(f"--calib-tokens must be at least 16 (got {calib_tokens})")
    Rotation(rotation, 1, rotation_seed)  # an unknown kind fails before any work
    if budget_bits is not None and not 2 <= budget_bits <= 8:
        raise InputError(f"--budget-bits {budget_bits:g}: no per-layer plan of 2/3/4/8 bits averages that",
                         hint="choose an average between 2 and 8")
    out = Path(out_dir).expanduser() if out_dir is not None else default_out_dir(str(src))
    _refuse_existing(out, force)
    text, text_label = (builtin_text(), "pydoc_data.topics (Python documentation)") if calib is None else \
        (read_user_text(Path(calib), "--calib"), Path(calib).name)
    source = resolve(str(src), revision=revision, token=token, offline=offline, progress=sys.stderr.isatty())
    say(f"reading {source.describe()}")
    sm = _read_source(source)
    cfg = ModelConfig.from_dict(sm.raw_config, source=source.describe())
    # fp32 model holding exactly the bundle's (dtype-rounded) values
    model = build_model(cfg, {k: t.to(out_dt) for k, t in sm.tensors.items()}, source=source.describe())
    sm.tensors.clear()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        dtype_name = str(out_dt).removeprefix("torch.")
        config = dict(sm.raw_config, torch_dtype=dtype_name,
                      xquant={"manifest": MANIFEST, "schema_version": SCHEMA_VERSION})
        write_json(tmp / "config.json", config)
        sm.write_tokenizer(tmp)
        say(f"writing {dtype_name} weights")
        written = ["config.json", *_present(tmp, TOKENIZER_FILES),
                   *save_weights(model, tmp, out_dt, shard_size)]
        projections = None
        artifacts = Artifacts()  # calibration measures the projections the bundle stores
        if uses_latents(cfg):
            say("computing SVD projections (float64)")
            tensors = projection_tensors([layer_projections(layer.self_attn.k_proj.weight,
                                                            layer.self_attn.v_proj.weight)
                                          for layer in model.layers], torch.float32)
            save_safetensors(tensors, tmp / PROJECTIONS)
            artifacts.set_projections(projections_from_tensors(tensors, cfg.num_hidden_layers))
            written.append(PROJECTIONS)
            projections = {"file": PROJECTIONS, "dtype": "float32", "svd": "float64, of the stored weights",
                           "sign_convention": SIGN_CONVENTION}
        say("calibrating")
        from xqcli.tokenizer import Tokenizer

        tokens = Tokenizer.from_folder(tmp).encode(text, add_special_tokens=False)[:calib_tokens]
        calibration = calibrate(model, tokens, text=text_label, artifacts=artifacts)
        if budget_bits is not None:  # the user's target joins the default plans (2.5, 3, 3.5)
            calibration["bit_plans"][f"{budget_bits:g}"] = bit_plan(attention_errors(calibration), budget_bits)
        write_json(tmp / CALIBRATION, calibration)
        written.append(CALIBRATION)
        defaults = CacheSpec.parse("xquant-4")
        manifest = {
            "schema_version": SCHEMA_VERSION, "xq_version": __version__, "source": sm.info,
            "config": cfg.to_dict(), "dtype": dtype_name, "projections": projections,
            "cache_defaults": {"cache": defaults.name, "group_size": defaults.group_size,
                               "window": defaults.window, "base_layers": defaults.base_layers,
                               "base_bits": defaults.base_bits},
            "calibration": _calibration_summary(calibration),
            "rotation": {"kind": rotation, "seed": rotation_seed, "widths": rotation_widths(cfg)},
            "files": [file_entry(tmp, name) for name in sorted(written)],
        }
        write_json(tmp / MANIFEST, manifest)
        _publish(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"wrote {out}")
    return out


def _refuse_existing(out: Path, force: bool) -> None:
    if os.path.lexists(out) and not force:
        raise InputError(f"{out} already exists", hint="pass --force to replace it, or choose another --out")


def _read_source(source: Source) -> _SourceModel:
    """Config, tensors and tokenizer of a resolved source (config checked before any weight is read)."""
    if source.kind == "gguf":
        from xqcli.sources.gguf import load_gguf, write_tokenizer_files

        g = load_gguf(source.path)
        return _SourceModel(g.config, g.tensors, {"kind": "gguf", "id": str(source.path.resolve()),
                                                  "sha256": g.sha256},
                            lambda folder: write_tokenizer_files(g, folder))
    folder = source.path
    cfg_path = check_model_folder(folder)
    ModelConfig.from_file(cfg_path)  # unsupported or broken configs fail here, before the weights
    raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    raw.pop("xquant", None)  # re-converting a bundle
    tensors = read_safetensors(shard_files(folder))
    if source.kind == "hub":
        info = {"kind": "hub", "id": source.repo_id, "revision": source.revision}
    else:
        info = {"kind": "folder", "id": str(folder.resolve())}

    def copy_tokenizer(dst: Path) -> None:
        for name in _present(folder, TOKENIZER_FILES):
            shutil.copyfile(folder / name, dst / name)

    return _SourceModel(raw, tensors, info, copy_tokenizer)


def _present(folder: Path, names: tuple[str, ...]) -> list[str]:
    return [n for n in names if (folder / n).is_file()]


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Every safetensors file of a bundle: text metadata only; format "pt" so transformers loads it too."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt", "xq_version": __version__})


def save_weights(model: torch.nn.Module, folder: Path, dtype: torch.dtype, shard_size: int) -> list[str]:
    """model.safetensors, or shards of at most `shard_size` bytes (module order) plus the HF index."""
    state = model.state_dict()
    nbytes = {k: t.numel() * dtype.itemsize for k, t in state.items()}
    shards: list[list[str]] = [[]]
    size = 0
    for name in state:
        if shards[-1] and size + nbytes[name] > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes[name]
    n = len(shards)
    files = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    files = files if n > 1 else ["model.safetensors"]
    for fname, keys in zip(files, shards):
        save_safetensors({k: state[k].to(dtype).contiguous() for k in keys}, folder / fname)
    if n == 1:
        return files
    write_json(folder / INDEX, {"metadata": {"total_size": sum(nbytes.values())},
                                "weight_map": {k: f for f, keys in zip(files, shards) for k in keys}})
    return [*files, INDEX]


def _calibration_summary(cal: dict[str, Any]) -> dict[str, Any]:
    """What xq.json says about calibration.json: enough to judge it without opening it."""
    layers = cal["layers"]
    energies = [rec["latent"]["k_channel0_energy"] for rec in layers if rec["latent"]]
    return {"file": CALIBRATION, "text": cal["text"], "tokens": cal["tokens"],
            "mean_k_channel0_energy": sum(energies) / len(energies) if energies else None,
            "most_sensitive_layers": sorted(range(len(layers)), key=lambda i: -layers[i]["sensitivity"])[:3]}


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished bundle into place; an old one is renamed away first and deleted last."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp and safetensors create private (0700/0600) entries
    for f in tmp.iterdir():
        os.chmod(f, 0o666 & ~umask)
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    _refuse_existing(out, force)
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()
