"""The xq bundle: a Hugging Face model folder plus `xq.json`, the SVD projections and a calibration.

Format and schema history: docs/bundle.md. A bundle is written by `xqcli.convert.pipeline` and read here;
its data reaches the runtime as `xqcli.bundle.artifacts.Artifacts`, its report is `xqcli.readouts.inspect`.
Opening is defensive because a bundle is input like any other file: the manifest is checked key by
key (never trusted to name files outside the folder) and its values are bounded, every listed file must
be a regular file inside the folder with its recorded size, no file xq would read may be present unlisted,
the projection tensors must have the shapes the config implies, and `verify=True` re-hashes every file
and the manifest itself (`manifest_sha256`). Loading the projections checks that they are finite and
belong to their layer. Each problem is one `BundleError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xqcli import __version__
from xqcli.bundle.projections import LayerProjections, SVDFactors, reproduction_errors
from xqcli.config import ModelConfig
from xqcli.errors import BundleError, InputError, XQError
from xqcli.fileio import sha256_file

SCHEMA_VERSION = 1
MANIFEST = "xq.json"
DAMAGED = "the file is damaged; convert the model again"  # the fix for a bundle file that cannot be read
PROJECTIONS = "projections.safetensors"
CALIBRATION = "calibration.json"
# calibration.json "version": 1 (no key) also held bit plans for the removed `+mix`; 2 holds statistics and
# clip ratios only. Both open: readers use only what both have. A larger number needs a newer xq.
CALIBRATION_VERSION = 2
SIGN_CONVENTION = "the largest-magnitude entry of each column of U is positive (the matching row of M flips)"
WEIGHT_DTYPES = ("bfloat16", "float16", "float32")
MANIFEST_DIGEST = "manifest_sha256"
# Every name xq reads from a model folder besides the weight shards (tokenizer, templates, configs).
READ_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "model.safetensors.index.json")
CACHE_DEFAULT_KEYS = ("cache", "group_size", "window", "base_layers", "base_bits")
MAX_SETTING = 1 << 20  # bound of every integer in 'cache_defaults' (a window of 1M tokens is already huge)
# The stored factors reproduce x·Wᵀ to ~1e-7 (float32 storage of a float64 SVD); a factor of another layer
# or model is off by O(1).
PROJECTION_TOLERANCE = 1e-4
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MAX_NAME = 255


@dataclass(frozen=True)
class BundleFile:
    path: str  # a plain file name inside the bundle
    size: int
    sha256: str


@dataclass
class Bundle:
    """An opened, checked bundle folder."""

    path: Path
    manifest: dict[str, Any]
    config: ModelConfig
    files: dict[str, BundleFile]

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def has_projections(self) -> bool:
        return isinstance(self.manifest.get("projections"), dict)

    def projections(self) -> list[LayerProjections]:
        """The stored per-layer factors (float32 in schema 1), exactly as the caches use them: refused when
        a value is not finite or a layer's factors do not rebuild that layer's stored K/V weights."""
        path = self.path / PROJECTIONS
        tensors = _read_tensors(path)
        bad = sorted(k for k, t in tensors.items() if not bool(torch.isfinite(t).all()))
        if bad:
            raise BundleError(f"{path}: {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''} hold NaN or Inf "
                              "values", hint="convert the model again")
        factors = projections_from_tensors(tensors, self.config.num_hidden_layers)
        weights = self._kv_weights()
        for i, lp in enumerate(factors):
            errors = reproduction_errors(*weights[i], lp)
            part, worst = max(errors.items(), key=lambda kv: kv[1])
            if not worst <= PROJECTION_TOLERANCE:
                raise BundleError(f"{path}: the {part} factors of layer {i} do not rebuild layer {i}'s weights "
                                  f"(relative error {worst:.3g}): they belong to another layer or model",
                                  hint="convert the model again")
        return factors

    def _kv_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's stored (k_proj.weight, v_proj.weight), read from the weight files alone."""
        from safetensors import SafetensorError, safe_open

        from xqcli.sources.hf import shard_files

        wanted = {f"model.layers.{i}.self_attn.{p}_proj.weight": (i, p)
                  for i in range(self.config.num_hidden_layers) for p in "kv"}
        found: dict[tuple[int, str], torch.Tensor] = {}
        for shard in shard_files(self.path):
            try:
                with safe_open(str(shard), framework="pt") as f:
                    found |= {wanted[k]: f.get_tensor(k) for k in f.keys() if k in wanted}
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise BundleError(f"{shard}: unreadable safetensors ({e})", hint=DAMAGED) from None
        missing = sorted(k for k, where in wanted.items() if where not in found)
        if missing:
            raise BundleError(f"{self.path}: the weights lack {', '.join(missing[:2])}")
        return [(found[i, "k"], found[i, "v"]) for i in range(self.config.num_hidden_layers)]

    def calibration(self) -> dict[str, Any] | None:
        """calibration.json as a dict, or None for a bundle converted without one."""
        if not isinstance(self.manifest.get("calibration"), dict):
            return None
        data = _read_json(self.path / CALIBRATION)
        _check_calibration(self.path / CALIBRATION, data, self.config.num_hidden_layers)
        return data


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's content without its own `manifest_sha256`: the UTF-8 bytes of
    `json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)` (docs/bundle.md)."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_entry(folder: Path, name: str) -> dict[str, Any]:
    """The manifest entry of one written file."""
    p = folder / name
    return {"path": name, "size": p.stat().st_size, "sha256": sha256_file(p)}


def is_bundle(folder: Path) -> bool:
    """A folder with an `xq.json` of any kind: a damaged one (a FIFO, a dangling link) is opened, and refused,
    as a bundle rather than read as a plain model folder."""
    return os.path.lexists(Path(folder) / MANIFEST)


def open_bundle(path: str | Path, verify: bool = False) -> Bundle:
    """Read and check a bundle; `verify` also re-hashes every file and the manifest (slow for big models)."""
    root = Path(path)
    if not os.path.lexists(root):
        raise InputError(f"{root} does not exist", hint="pass a bundle folder made by xq convert")
    if not root.is_dir():
        raise InputError(f"{root} is not a folder", hint="pass a bundle folder made by xq convert")
    if not os.path.lexists(root / MANIFEST):  # never a bundle: bad input (2); a damaged xq.json is corrupt (4)
        fix = (f"it is a model folder: convert it first, xq convert {root}" if (root / "config.json").is_file()
               else "pass a bundle folder, or make one: xq convert MODEL")
        raise InputError(f"{root} is not an xq bundle (no {MANIFEST})", hint=fix)
    _check_regular(root, MANIFEST)
    m = _read_json(root / MANIFEST)
    _check_schema(root, m)
    if verify:
        _verify_manifest(root, m)
    required = (("xq_version", str), ("dtype", str), ("source", dict), ("config", dict), ("files", list))
    for key, kind in required:
        if not isinstance(m.get(key), kind):
            raise BundleError(f"{root / MANIFEST}: {key!r} is missing or not a {kind.__name__}")
    if m["dtype"] not in WEIGHT_DTYPES:
        raise BundleError(f"{root / MANIFEST}: dtype {m['dtype']!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    files = _check_files(root, m["files"])
    if verify:  # before reading any content, so a changed file is named as such
        for f in files.values():
            if sha256_file(root / f.path) != f.sha256:
                raise BundleError(f"{root / f.path}: content differs from the manifest (sha256 mismatch)",
                                  hint="the file was modified or corrupted; convert the model again")
    for name in ("config.json", "tokenizer.json"):
        if name not in files:
            raise BundleError(f"{root / MANIFEST}: the bundle does not list {name}")
    unlisted = [n for n in READ_FILES if n not in files and os.path.lexists(root / n)]
    if unlisted:
        raise BundleError(f"{root}: {', '.join(unlisted)} not listed in {MANIFEST}: xq reads only the files "
                          "the manifest lists and hashes", hint="remove it, or convert the model again")
    config = _check_config(root, m["config"])
    _check_weights(root, files)
    _check_projections(root, m, files, config)
    _check_optional_file(root, m, "calibration", CALIBRATION, files)
    _check_cache_defaults(root, m.get("cache_defaults"), config)
    _check_rotation(root, m.get("rotation"), config)
    return Bundle(root, m, config, files)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise BundleError(f"{path}: unreadable safetensors ({e})", hint=DAMAGED) from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BundleError(f"{path}: unreadable JSON ({type(e).__name__}: {e})", hint=DAMAGED) from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object")
    return data


def _verify_manifest(root: Path, m: dict[str, Any]) -> None:
    recorded = m.get(MANIFEST_DIGEST)
    if recorded is None:
        raise BundleError(f"{root / MANIFEST} has no {MANIFEST_DIGEST}, so its own content cannot be verified",
                          hint="convert the model again with this xq")
    if recorded != manifest_digest(m):
        raise BundleError(f"{root / MANIFEST}: content differs from its {MANIFEST_DIGEST} (edited or corrupted)",
                          hint="the manifest was modified; convert the model again")


def _check_schema(root: Path, m: dict[str, Any]) -> None:
    v = m.get("schema_version")
    if type(v) is not int or v < 1:
        raise BundleError(f"{root / MANIFEST}: 'schema_version' must be a positive integer (got {v!r})")
    if v > SCHEMA_VERSION:
        raise BundleError(f"{root} uses bundle schema {v}; this xq {__version__} reads schema "
                          f"{SCHEMA_VERSION}",
                          hint="upgrade xq (pip install -U xqcli), or convert the model again with this xq")


def _check_regular(root: Path, name: str) -> int:
    """The size of `root/name`, refused unless it is a regular file inside the bundle (a link may lead to
    one there); a FIFO or device would block or never end, so it is never opened."""
    p = root / name
    try:
        real_root, real = root.resolve(), p.resolve()
        if real.parent != real_root:
            raise BundleError(f"{p}: a link that leads outside the bundle")
        st = p.stat()
    except FileNotFoundError:
        raise BundleError(f"{p}: listed in {MANIFEST} but missing", hint="copy the whole bundle folder") from None
    except (OSError, ValueError, RuntimeError) as err:  # ValueError: a name the OS cannot encode; RuntimeError: a link loop
        raise BundleError(f"{p}: cannot read it ({getattr(err, 'strerror', None) or err})") from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{p}: not a regular file", hint="a bundle holds plain files only")
    return st.st_size


def _check_files(root: Path, entries: list[Any]) -> dict[str, BundleFile]:
    files: dict[str, BundleFile] = {}
    for e in entries:
        if not isinstance(e, dict):
            raise BundleError(f"{root / MANIFEST}: every 'files' entry must be an object")
        name, size, digest = e.get("path"), e.get("size"), e.get("sha256")
        if not isinstance(name, str) or not _plain_name(name):
            raise BundleError(f"{root / MANIFEST}: file name {name!r} is not a plain file name inside the "
                              "bundle")
        if type(size) is not int or size < 0 or not isinstance(digest, str) or not _SHA256.match(digest):
            raise BundleError(f"{root / MANIFEST}: {name}: 'size' must be an integer and 'sha256' 64 hex "
                              "digits")
        if name in files:
            raise BundleError(f"{root / MANIFEST}: {name} is listed twice")
        actual = _check_regular(root, name)
        if actual != size:
            raise BundleError(f"{root / name}: {actual} bytes, the manifest says {size} (truncated or modified)")
        files[name] = BundleFile(name, size, digest)
    return files


def _plain_name(name: str) -> bool:
    return (0 < len(name) <= _MAX_NAME and name not in (".", "..") and not any(c in name for c in "/\\\0")
            and name != MANIFEST)


def _check_config(root: Path, raw: dict[str, Any]) -> ModelConfig:
    try:
        config = ModelConfig.from_file(root / "config.json")
    except XQError as e:
        raise BundleError(f"{root}: {e}") from None
    if json.loads(json.dumps(config.to_dict())) != raw:
        raise BundleError(f"{root / MANIFEST}: 'config' does not match config.json",
                          hint="config.json was edited after conversion; convert the model again")
    return config


def _check_weights(root: Path, files: dict[str, BundleFile]) -> None:
    from xqcli.sources.hf import shard_files

    try:
        shards = shard_files(root)
    except XQError as e:
        raise BundleError(f"{root}: {e}") from None
    index = "model.safetensors.index.json"
    names = [s.name for s in shards] + ([index] if (root / index).is_file() else [])
    unlisted = [n for n in names if n not in files]
    if unlisted:
        raise BundleError(f"{root / MANIFEST}: weight file(s) {', '.join(unlisted)} are not in the manifest")


def _check_optional_file(root: Path, m: dict[str, Any], key: str, name: str,
                         files: dict[str, BundleFile]) -> None:
    section = m.get(key)
    if section is None:
        return
    if not isinstance(section, dict) or section.get("file") != name:
        raise BundleError(f"{root / MANIFEST}: {key!r} must be null or an object with \"file\": \"{name}\"")
    if name not in files:
        raise BundleError(f"{root / MANIFEST}: {name} is named by {key!r} but not listed in 'files'")


def _check_projections(root: Path, m: dict[str, Any], files: dict[str, BundleFile], cfg: ModelConfig) -> None:
    from xqcli.cache.spec import uses_latents

    _check_optional_file(root, m, "projections", PROJECTIONS, files)
    if m.get("projections") is None:
        if uses_latents(cfg):
            raise BundleError(f"{root / MANIFEST}: this grouped-query model needs {PROJECTIONS} "
                              "(none listed)")
        return
    want = projection_shapes(cfg)
    from safetensors import SafetensorError, safe_open

    path = root / PROJECTIONS
    try:
        with safe_open(str(path), framework="pt") as f:
            have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise BundleError(f"{path}: unreadable safetensors ({e})", hint=DAMAGED) from None
    bad = sorted(set(want) ^ set(have)) + sorted(f"{k} {list(have[k])} != {list(want[k])}"
                                                  for k in set(want) & set(have) if have[k] != want[k])
    if bad:
        shown = ", ".join(bad[:4]) + (f" (+{len(bad) - 4} more)" if len(bad) > 4 else "")
        raise BundleError(f"{path}: tensors do not match config.json: {shown}")
    if not dtypes <= {"F32", "F64"}:
        raise BundleError(f"{path}: projections must be float32 or float64 "
                          f"(found {', '.join(sorted(dtypes))})")


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of projections.safetensors (see `xqcli.bundle.projections` for the maths)."""
    d, r = cfg.hidden_size, cfg.kv_dim
    out: dict[str, tuple[int, ...]] = {}
    for i in range(cfg.num_hidden_layers):
        for p in ("k", "v"):
            out |= {f"layers.{i}.{p}.u": (d, r), f"layers.{i}.{p}.m": (r, r), f"layers.{i}.{p}.s": (r,)}
        out |= {f"layers.{i}.kv.u": (d, 2 * r), f"layers.{i}.kv.s": (2 * r,)}
    return out


def projection_tensors(projections: list[LayerProjections], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Flat safetensors names `layers.{i}.{k,v,kv}.{u,m,s}` (the kv basis has no M)."""
    out = {}
    for i, lp in enumerate(projections):
        for p, f in (("k", lp.k), ("v", lp.v), ("kv", lp.kv)):
            out[f"layers.{i}.{p}.u"] = f.u
            out[f"layers.{i}.{p}.s"] = f.s
            if p != "kv":
                out[f"layers.{i}.{p}.m"] = f.m
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def projections_from_tensors(tensors: dict[str, torch.Tensor], n_layers: int) -> list[LayerProjections]:
    """The inverse of `projection_tensors`."""
    def factor(i: int, p: str) -> SVDFactors:  # the kv basis is stored without M
        return SVDFactors(*(tensors.get(f"layers.{i}.{p}.{t}", torch.empty(0, 0)) for t in ("u", "m", "s")))

    return [LayerProjections(factor(i, "k"), factor(i, "v"), factor(i, "kv")) for i in range(n_layers)]


def _check_calibration(path: Path, data: dict[str, Any], n_layers: int) -> None:
    """The fields that `xq inspect` shows and `xq eval --calibrated` applies, checked before any use."""

    def num(v: Any) -> bool:
        return type(v) in (int, float) and math.isfinite(v)

    def per_method(section: Any, ok) -> bool:  # {"xquant": {"2": value, ...}, "kivi": {...}}
        return isinstance(section, dict) and all(isinstance(c, dict) and all(num(x) and ok(x) for x in c.values())
                                                 for c in section.values())

    def layer_ok(r: Any) -> bool:
        return (isinstance(r, dict) and isinstance(r.get("x"), dict) and num(r["x"].get("max_abs"))
                and (r.get("latent") is None or (isinstance(r["latent"], dict)
                                                 and num(r["latent"].get("k_channel0_energy"))))
                and per_method(r.get("clip"), lambda c: 0 < c <= 1)
                and per_method(r.get("kv_error"), lambda e: e >= 0))

    version, layers = data.get("version", 1), data.get("layers")  # version 1 has no key
    if type(version) is int and version > CALIBRATION_VERSION:
        raise BundleError(f"{path}: calibration version {version} is newer than this xq reads "
                          f"({CALIBRATION_VERSION})", hint="upgrade xq")
    if not (type(version) is int and version >= 1 and isinstance(layers, list) and len(layers) == n_layers
            and all(map(layer_ok, layers))):
        raise BundleError(f"{path}: malformed calibration record", hint="convert the model again")


def _check_cache_defaults(root: Path, section: Any, cfg: ModelConfig) -> None:
    """A known cache kind and documented integer settings within bounds (a window at most the model's
    positions), so a default can never make a command allocate for tokens the model cannot hold."""
    from xqcli.cache.spec import CacheSpec

    if section is None:
        return
    try:
        if not isinstance(section, dict) or not isinstance(section.get("cache"), str):
            raise TypeError("expected {\"cache\": KIND, ...}")
        unknown = sorted(set(section) - set(CACHE_DEFAULT_KEYS))
        if unknown:
            raise TypeError(f"unknown setting {unknown[0]!r}; known: {', '.join(CACHE_DEFAULT_KEYS[1:])}")
        settings = {k: v for k, v in section.items() if k != "cache"}
        for key, value in settings.items():
            if type(value) is not int or not 0 <= value <= MAX_SETTING:
                raise TypeError(f"{key} must be an integer from 0 to {MAX_SETTING} (got {value!r})")
        if settings.get("window", 0) > cfg.max_position_embeddings:
            raise TypeError(f"window {settings['window']} exceeds the model's {cfg.max_position_embeddings} "
                            "positions")
        CacheSpec.parse(section["cache"], **settings)
    except (XQError, TypeError) as e:
        raise BundleError(f"{root / MANIFEST}: bad 'cache_defaults' ({e})") from None


def rotation_widths(cfg: ModelConfig) -> list[int]:
    """Widths `+rot` caches rotate: X (d), the latent X·U_v (d_kv) and the CL latent X·U_kv (2·d_kv)."""
    return [cfg.hidden_size, cfg.kv_dim, 2 * cfg.kv_dim]


def _check_rotation(root: Path, section: Any, cfg: ModelConfig) -> None:
    """The rotation chosen at convert time must be one xq knows and be made for this model's widths."""
    if section is None:
        return
    from xqcli.bundle.rotation import KINDS, MAX_SEED, Rotation

    where = root / MANIFEST
    try:
        if not isinstance(section, dict):
            raise InputError("not an object")
        Rotation(section.get("kind"), 1, section.get("seed", 0))
    except InputError as e:
        raise BundleError(f"{where}: 'rotation' must be {{kind: {'|'.join(KINDS)}, seed: 0..{MAX_SEED}, "
                          f"widths: [...]}} ({e})") from None
    if section.get("widths") != rotation_widths(cfg):
        raise BundleError(f"{where}: the rotation (widths {section.get('widths')}) does not match the model "
                          f"(widths {rotation_widths(cfg)})", hint="convert the model again")
