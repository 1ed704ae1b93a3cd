"""Convert any model source (HF id, HF folder, `.gguf`) into an xq bundle folder (docs/bundle.md).

The model is built from the weights already cast to the bundle dtype, so the SVD projections and the
calibration describe exactly what a bundle user will run. Everything is written into a temporary folder
beside the target and renamed into place at the end (style Part 4 item 9): a convert that fails or is
interrupted (Ctrl-C, SIGTERM, SIGHUP) leaves neither a bundle nor a temporary folder, the cleanup and the
final renames hold further signals until they are done, and a later convert removes the temporary
folders of processes that died (SIGKILL, power loss). `force` replaces only a bundle or an empty folder,
never the source, and only once the new bundle is complete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xqcli import __version__
from xqcli.bundle.artifacts import Artifacts
from xqcli.bundle.format import (
    CALIBRATION,
    MANIFEST,
    MANIFEST_DIGEST,
    PROJECTIONS,
    SCHEMA_VERSION,
    SIGN_CONVENTION,
    file_entry,
    is_bundle,
    manifest_digest,
    projection_tensors,
    projections_from_tensors,
    rotation_widths,
)
from xqcli.bundle.projections import layer_projections
from xqcli.bundle.rotation import Rotation
from xqcli.cache.spec import CacheSpec, uses_latents
from xqcli.config import ModelConfig
from xqcli.convert.calibrate import DEFAULT_TOKENS, calibrate
from xqcli.texts import builtin_text
from xqcli.errors import InputError, ResourceError, XQError
from xqcli.fileio import write_json
from xqcli.load import build_model, check_vocab, expected_shapes
from xqcli.sources.hf import check_model_folder, parse_dtype, read_safetensors, shard_files
from xqcli.sources.hub import ALLOW_PATTERNS, Source, resolve
from xqcli.texts import read_user_text
from xqcli.units import format_bytes

DEFAULT_SHARD_SIZE = 2 * 10**9
INDEX = "model.safetensors.index.json"
# Tokenizer, template and generation files are copied verbatim from a folder source.
TOKENIZER_FILES = tuple(p for p in ALLOW_PATTERNS if "*" not in p and p not in ("config.json", INDEX))
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[0-9a-f]{6})-(?P<pid>[0-9]{1,9})-[0-9a-f]{8}$")


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
            progress: Callable[[str], None] | None = None) -> Path:
    """Write the bundle of `src` and return its folder. `progress` receives one line per stage; calibration
    also shows a bar with its ETA on stderr when that is a terminal."""
    say = progress or (lambda _msg: None)
    out_dt = parse_dtype(dtype)
    if shard_size < 1:
        raise InputError(f"shard size must be positive (got {shard_size})")
    if calib_tokens < 16:
        raise InputError(f"--calib-tokens must be at least 16 (got {calib_tokens})")
    Rotation(rotation, 1, rotation_seed)  # an unknown kind fails before any work
    out = Path(out_dir).expanduser() if out_dir is not None else default_out_dir(str(src))
    local = Path(src).expanduser()
    check_target(out, force, local if local.exists() else None)  # before any download
    text, text_label = (builtin_text(), "pydoc_data.topics (Python documentation)") if calib is None else \
        (read_user_text(Path(calib), "--calib"), Path(calib).name)
    source = resolve(str(src), revision=revision, token=token, offline=offline, progress=sys.stderr.isatty())
    check_target(out, force, source.path)  # a hub source's folder is known now
    with _signals_interrupt():
        tmp = _make_temp(out)
        try:
            remove_stale_temps(out.parent)
            say(f"reading {source.describe()}")
            sm = _read_source(source)
            cfg = ModelConfig.from_dict(sm.raw_config, source=source.describe())
            dtype_name = str(out_dt).removeprefix("torch.")
            config = dict(sm.raw_config, torch_dtype=dtype_name,
                          xquant={"manifest": MANIFEST, "schema_version": SCHEMA_VERSION})
            write_json(tmp / "config.json", config)
            sm.write_tokenizer(tmp)
            _check_space(tmp, bundle_bytes(cfg, out_dt))
            # fp32 model holding exactly the bundle's (dtype-rounded) values
            model = build_model(cfg, {k: t.to(out_dt) for k, t in sm.tensors.items()}, source=source.describe())
            sm.tensors.clear()
            say(f"writing {dtype_name} weights")
            written = ["config.json", *_present(tmp, TOKENIZER_FILES), *save_weights(model, tmp, out_dt, shard_size)]
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
            with _layer_bar("calibration", cfg.num_hidden_layers) as bar:
                calibration = calibrate(model, tokens, text=text_label, artifacts=artifacts, progress=bar)
            write_json(tmp / CALIBRATION, calibration)
            written.append(CALIBRATION)
            defaults = CacheSpec.parse("xquant-4")
            manifest = {
                "schema_version": SCHEMA_VERSION, "xq_version": __version__, "source": sm.info,
                "config": cfg.to_dict(), "dtype": dtype_name, "projections": projections,
                "cache_defaults": {"cache": defaults.name, "group_size": defaults.group_size,
                                   "window": min(defaults.window, cfg.max_position_embeddings),
                                   "base_layers": defaults.base_layers, "base_bits": defaults.base_bits},
                "calibration": _calibration_summary(calibration),
                "rotation": {"kind": rotation, "seed": rotation_seed, "widths": rotation_widths(cfg)},
                "files": [file_entry(tmp, name) for name in sorted(written)],
            }
            manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
            write_json(tmp / MANIFEST, manifest)
            _publish(tmp, out, force, source.path)
        except BaseException as e:
            with _signals_deferred():  # a second Ctrl-C must not leave half a folder
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                raise _write_error(e, out) from None
            raise
    say(f"wrote {out}")
    return out


def check_target(out: Path, force: bool, source: Path | None = None) -> None:
    """`out` may be written: absent, or with `force` a bundle folder or an empty folder that neither is nor
    contains the source. Anything else (a user's folder or file, the source itself) is never deleted."""
    if not os.path.lexists(out):
        return
    # What --force cannot replace is refused without suggesting --force (it would be refused in turn).
    if source is not None and _holds(out, source):
        raise InputError(f"{out} is or contains the source {source}"
                         + (": --force would delete it" if force else ""), hint="choose another --out")
    why, fix = (("is a symbolic link", "remove that link") if out.is_symlink()
                else ("is not a folder", "move that file away") if not out.is_dir()
                else (None, "") if is_bundle(out) or not any(out.iterdir())
                else ("is not an xq bundle (no xq.json) and not empty", "empty that folder"))
    if why is not None:
        raise InputError(f"{out} {why}: --force replaces only a bundle folder or an empty folder",
                         hint=f"choose another --out, or {fix} yourself")
    if not force:
        raise InputError(f"{out} already exists", hint="pass --force to replace it, or choose another --out")


def _holds(out: Path, source: Path) -> bool:
    """Whether `out` is `source` or a folder above it, symbolic links resolved."""
    real_out, real_src = out.resolve(), source.resolve()
    return real_src == real_out or real_src.is_relative_to(real_out)


def temp_name(name: str, kind: str, pid: int | None = None) -> str:
    """`.NAME.KIND-HOST-PID-RANDOM`: a temporary (`tmp`) or replaced (`old`) bundle beside NAME, owned by
    process PID on this machine (HOST: 6 hex digits of the host name), so a later convert knows when it is stale."""
    return f".{name}.{kind}-{_HOST}-{os.getpid() if pid is None else pid}-{uuid.uuid4().hex[:8]}"


def remove_stale_temps(parent: Path) -> None:
    """Delete the temporary folders in `parent` whose owner (a process of this machine) is gone; a replaced
    bundle whose successor never arrived (the owner died between the two renames) is renamed back."""
    for entry in parent.iterdir():
        m = _TEMP.match(entry.name)
        if m is None or m["host"] != _HOST or _alive(int(m["pid"])) or entry.is_symlink() or not entry.is_dir():
            continue
        target = parent / m["name"]
        if m["kind"] == "old" and not os.path.lexists(target):
            os.rename(entry, target)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _make_temp(out: Path) -> Path:
    """The temporary folder beside `out`, made first: an unwritable place fails before any work."""
    tmp = out.parent / temp_name(out.name, "tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise _write_error(e, out) from None
    return tmp


def bundle_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """The bytes the weights and projections of a bundle of `cfg` take (the rest is a few MB at most)."""
    from xqcli.bundle.format import projection_shapes

    weights = sum(math.prod(s) for s in expected_shapes(cfg).values()) * dtype.itemsize
    return weights + (sum(math.prod(s) for s in projection_shapes(cfg).values()) * 4 if uses_latents(cfg) else 0)


def _check_space(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if need > free:
        raise ResourceError(f"the bundle does not fit: it needs about {format_bytes(need)}, {folder.parent} has "
                            f"{format_bytes(free)} free", hint="free some space, or choose another --out")


def _write_error(e: OSError, out: Path) -> XQError:
    """An OSError while writing the bundle: no space is 7 (does not fit), anything else is a bad --out (2)."""
    where = e.filename or out
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceError(f"{where}: {e.strerror}: the bundle does not fit on that disk",
                             hint="free some space, or choose another --out")
    return InputError(f"cannot write {where}: {e.strerror or e}", hint="choose another --out")


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
    cfg = ModelConfig.from_file(cfg_path)  # unsupported or broken configs fail here, before the weights
    from xqcli.tokenizer import Tokenizer

    # so does a missing, broken or mismatched tokenizer, named in the source, not the temp folder
    check_vocab(Tokenizer.from_folder(folder), cfg, source.describe())
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
    from safetensors.torch import save

    # Serialized here and written by Python, so a failed write is an OSError with its errno (no space, ...).
    path.write_bytes(save(tensors, metadata={"format": "pt", "xq_version": __version__}))


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
    energies = [rec["latent"]["k_channel0_energy"] for rec in cal["layers"] if rec["latent"]]
    return {"file": CALIBRATION, "text": cal["text"], "tokens": cal["tokens"],
            "mean_k_channel0_energy": sum(energies) / len(energies) if energies else None}


@contextmanager
def _layer_bar(description: str, layers: int) -> Iterator[Callable[[int, int], None]]:
    """A per-layer progress bar with an ETA on stderr, drawn only on a terminal (nothing on a pipe) and
    erased when done; yields its `progress(done, total)` callback."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TextColumn("layers"),
                  TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=layers)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _publish(tmp: Path, out: Path, force: bool, source: Path) -> None:
    """Rename the finished bundle into place; an old one is renamed away first and deleted last. Signals
    wait until this is done: no interruption between the renames can lose the old bundle."""
    with _signals_deferred():
        if not os.path.lexists(out):
            os.rename(tmp, out)
            return
        check_target(out, force, source)  # again: the target may have changed during the work
        old = out.parent / temp_name(out.name, "old")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP during a convert: handled exactly like Ctrl-C (exit 130, nothing left behind)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def _raise_interrupted(signum: int, _frame: Any) -> None:
    raise Interrupted(signum)


def _handled_signals(signums: tuple[int, ...]) -> list[int]:
    """The signals among `signums` a handler may be set for: only from the main thread, and not ones the
    user chose to ignore (`nohup` ignores SIGHUP)."""
    if threading.current_thread() is not threading.main_thread():
        return []
    return [s for s in signums if signal.getsignal(s) is not signal.SIG_IGN]


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP (kill, timeout, CI cancellation, a closed terminal) raise `Interrupted` meanwhile."""
    old = {s: signal.signal(s, _raise_interrupted) for s in _handled_signals((signal.SIGTERM, signal.SIGHUP))}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP are held until the block ends, then raised as an interruption."""
    caught: list[int] = []
    signums = _handled_signals((signal.SIGINT, signal.SIGTERM, signal.SIGHUP))
    old = {s: signal.signal(s, lambda signum, _frame: caught.append(signum)) for s in signums}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if caught:
            raise Interrupted(caught[0])
