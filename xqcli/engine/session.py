"""Session files: a conversation and its cache (row 0) in one safetensors file, refused by another model.

The cache writes and reads its own state (`state_dict` / `load_state_dict`); this module adds the
token ids, the messages and what the cache depends on (`model_identity`), and checks them on load.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from xqcli.cache.spec import CacheSpec, uses_latents
from xqcli.errors import InputError, ResourceError
from xqcli.load import model_projections

if TYPE_CHECKING:
    from xqcli.bundle.artifacts import Artifacts
    from xqcli.engine.loop import Engine
    from xqcli.model import Transformer


SESSION_FORMAT = "xq-session"
SESSION_SCHEMA = 1


def model_identity(model: Transformer, artifacts: Artifacts, source: str, spec: CacheSpec | None = None
                   ) -> dict[str, str]:
    """What a saved cache depends on: the config, a hash of a few weight tensors, the dtype, and for
    latent caches the SVD projections in use (a bundle's stored ones or the ones computed at load),
    for rotated caches the rotation."""
    cfg = model.config
    conf = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    h = hashlib.sha256()
    layers = model.layers
    picks = [model.model.embed_tokens.weight[:8], model.model.norm.weight, layers[0].self_attn.k_proj.weight[:8],
             layers[-1].self_attn.v_proj.weight[:8], layers[-1].mlp.down_proj.weight[:8], model.output_weight()[-8:]]
    for t in picks:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    ident = {"source": source, "config_sha256": hashlib.sha256(conf.encode()).hexdigest(),
             "weights_sha256": h.hexdigest(), "dtype": str(model.dtype).removeprefix("torch.")}
    if spec is not None and spec.method in ("xquant", "xquant-cl") and uses_latents(cfg):
        p = model_projections(model, artifacts)[0]  # the factors the caches use
        ph = hashlib.sha256()
        for t in (p.k.u[:8], p.v.u[:8], p.kv.u[:8]):
            ph.update(t.detach().double().cpu().contiguous().numpy().tobytes())
        ident["projections_sha256"] = ph.hexdigest()
    if spec is not None and spec.rotate:  # +rot: which rotation the stored codes were taken in
        ident["rotation"] = repr(tuple(artifacts.rotation))
    return ident


def save_session(path: str | Path, engine: Engine, messages: list[dict[str, Any]], source: str) -> dict[str, Any]:
    """Write the conversation and its cache (row 0) to a safetensors file; returns the metadata written."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from xqcli import __version__

    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder", hint="give a file name, e.g. /save chat.safetensors")
    if not path.parent.is_dir():
        raise InputError(f"cannot write the session file {path}: the folder {path.parent} does not exist",
                         hint="create the folder first, or save elsewhere")
    state = engine.cache.state_dict()
    tensors = {f"cache.{k}": v.detach().contiguous().cpu() for k, v in state["tensors"].items()}
    tensors["ids"] = torch.tensor(engine.ids[0], dtype=torch.long)
    identity = model_identity(engine.model, engine.artifacts, source, engine.spec)
    meta = {"xq_version": __version__, "model": identity, "cache": state["meta"], "messages": messages,
            "ids": engine.ids[0]}
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata={"format": SESSION_FORMAT, "schema": str(SESSION_SCHEMA),
                                               "session": json.dumps(meta)})
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:  # safetensors reports I/O errors as its own type
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot write the session file {path}: {e}") from None
    return meta


_IDENTITY_LABELS = {"config_sha256": "model config", "weights_sha256": "model weights", "dtype": "dtype",
                   "projections_sha256": "SVD projections", "rotation": "rotation"}


def _refuse_other_model(path: Path, saved: dict[str, Any], here: dict[str, str], keys: tuple[str, ...]) -> None:
    diff = [f"{_IDENTITY_LABELS[k]} ({str(saved.get(k, 'none'))[:12]} saved, {here.get(k, 'none')[:12]} here)"
            for k in keys if saved.get(k) != here.get(k)]
    if diff:
        raise InputError(f"{path} was saved with another model ({saved.get('source')}): "
                         f"{'; '.join(diff)} differ", hint="load it with the model it was saved with")


def _messages(value: Any) -> list[dict[str, str]]:
    """The saved conversation: a list of {"role": text, "content": text} (ValueError otherwise)."""
    if not isinstance(value, list):
        raise ValueError(f"messages is a {type(value).__name__}, not a list")
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"a message is not a role and a text: {str(m)[:60]}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def load_session(path: str | Path, engine: Engine, source: str) -> dict[str, Any]:
    """Read a session file into `engine` (cache row 0 and its ids); returns its metadata (with `messages`).

    Refuses, naming what differs, a file from another model (config, weights, dtype, projections) or
    cache kind/settings; the engine is left untouched then.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a session file", hint="give the file /save wrote")
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path} is not a session file: {e}") from None
    if header.get("format") != SESSION_FORMAT:
        raise InputError(f"{path} is not an xq session file (format {header.get('format')!r})")
    if header.get("schema") != str(SESSION_SCHEMA):
        raise InputError(f"{path} has session schema {header.get('schema')}, this xq reads {SESSION_SCHEMA}",
                         hint="load it with the xq version that wrote it")
    try:
        meta = json.loads(header["session"])
        saved_model, cache_meta, ids = dict(meta["model"]), dict(meta["cache"]), [int(i) for i in meta["ids"]]
        saved_spec = dict(cache_meta.get("spec", {}))
        meta["messages"] = _messages(meta["messages"])
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:  # JSON of any shape and depth
        raise InputError(f"{path}: corrupt session metadata ({type(e).__name__}: {str(e)[:200]})") from None
    vocab = engine.model.config.vocab_size
    if any(not 0 <= i < vocab for i in ids):
        raise InputError(f"{path}: a saved token id is outside the model's vocabulary of {vocab:,} ids (file edited?)")
    here = model_identity(engine.model, engine.artifacts, source, engine.spec)
    _refuse_other_model(path, saved_model, here, ("config_sha256", "weights_sha256", "dtype"))
    if len(ids) > engine.context:  # first: a smaller context also cuts the window, which would be named instead
        raise ResourceError(f"{path} holds {len(ids):,} tokens, more than this cache's capacity of {engine.context:,}",
                            hint=f"start xq chat with --context {len(ids)} or more")
    mine = engine.cache.spec_settings()
    sdiff = [f"{k} {saved_spec.get(k)!r} saved vs {mine.get(k)!r} here" for k in sorted(set(saved_spec) | set(mine))
             if saved_spec.get(k) != mine.get(k)]
    if sdiff:  # before the projections and rotation: those follow from the cache kind
        hint = "start xq chat with the cache settings it was saved with"
        saved_window = saved_spec.get("window")
        if isinstance(saved_window, int) and mine.get("window") == engine.context < saved_window:
            hint = (f"this chat's --context {engine.context:,} cuts the window to {engine.context:,} tokens: start xq "
                    f"chat with --context {saved_window} or more")
        raise InputError(f"{path} holds a {saved_spec.get('name')} cache, this session uses {mine.get('name')}: "
                         f"{'; '.join(sdiff)}", hint=hint)
    _refuse_other_model(path, saved_model, here, ("projections_sha256", "rotation"))
    if not torch.equal(tensors.get("ids", torch.empty(0)), torch.tensor(ids, dtype=torch.long)):
        raise InputError(f"{path}: the token ids in the metadata and the tensors disagree (file edited?)")
    cache_tensors = {k.removeprefix("cache."): v for k, v in tensors.items() if k.startswith("cache.")}
    if len(cache_meta.get("lengths", [])) != 1 or cache_meta["lengths"][0] != len(ids):
        raise InputError(f"{path}: the cache holds {cache_meta.get('lengths')} tokens but {len(ids)} ids are saved")
    with torch.inference_mode():
        engine.reset()
        try:
            engine.cache.load_state_dict({"meta": cache_meta, "tensors": cache_tensors})
        except BaseException:
            engine.reset()
            raise
    engine.ids[0] = ids
    return meta
