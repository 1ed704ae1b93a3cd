"""Resolve a model source (local folder, `.gguf` file, or Hugging Face id `org/name[@revision]`).

This is the only module that imports huggingface_hub. Downloads fetch only the files xq needs, and
`config.json` is fetched and checked first, so an unsupported architecture fails before any weight
download.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from xqcli.errors import HubError, InputError, WeightsError

ALLOW_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                  "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                  "chat_template.json"]
HF_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")


@dataclass(frozen=True)
class Source:
    kind: str  # "folder" | "gguf" | "hub"
    path: Path  # the local folder or file
    repo_id: str | None = None
    revision: str | None = None  # the resolved commit for hub sources

    def describe(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.kind == "hub" else str(self.path)


def hub_cache_info() -> dict:
    """Where the HF cache is and whether we are offline, without importing huggingface_hub."""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or str(home / "hub")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    return {"cache_dir": cache, "offline": offline}


def token_source() -> str | None:
    """Where huggingface_hub finds a token (its own discovery: HF_TOKEN, then the token file of `hf auth login`),
    or None without one. Never the token itself. An OIDC exchange (HF_OIDC_RESOURCE) would reach the network, so
    it is named, not tried."""
    if os.environ.get("HF_OIDC_RESOURCE"):
        return "OIDC exchange (HF_OIDC_RESOURCE; not tried here)"
    import huggingface_hub
    from huggingface_hub import constants

    if not huggingface_hub.get_token():
        return None
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(var, "").strip():
            return f"the {var} variable"
    if Path(constants.HF_TOKEN_PATH).is_file():
        return f"the token file {constants.HF_TOKEN_PATH}"
    return "a Google Colab secret"


# The HF_HUB_OFFLINE value the running command's --offline/--online wrote: errors name the flag, not the variable.
_FLAG_WROTE: dict[str, str] = {}


def apply_offline(offline: bool | None) -> None:
    """A command's --offline/--online: HF_HUB_OFFLINE for this process, set before huggingface_hub is imported
    (it reads the variable once), so every lookup of the command, whoever makes it, follows it. None: as set."""
    _FLAG_WROTE.clear()
    if offline is not None:
        os.environ["HF_HUB_OFFLINE"] = _FLAG_WROTE["value"] = "1" if offline else "0"


def _offline_cause(flag: bool | None) -> str:
    """What made a lookup offline: the command's --offline, or the HF_HUB_OFFLINE variable."""
    by_flag = flag or os.environ.get("HF_HUB_OFFLINE") == _FLAG_WROTE.get("value")
    return "--offline was given" if by_flag else "HF_HUB_OFFLINE is set"


def show_progress() -> bool:
    """Download bars on a terminal only (on stderr, where huggingface_hub draws them): in a pipe or a log they would
    be a stream of carriage returns. HF_HUB_DISABLE_PROGRESS_BARS, when set, wins (1: never, 0: always)."""
    from huggingface_hub import constants

    forced = constants.HF_HUB_DISABLE_PROGRESS_BARS  # None when unset
    return sys.stderr.isatty() if forced is None else not forced


def resolve(src: str, *, revision: str | None = None, token: str | None = None, offline: bool | None = None,
            progress: bool | None = None) -> Source:
    """A local `.gguf` or folder is used as is; anything shaped like `org/name[@rev]` goes to the hub.
    `progress`: download bars; None (every command) decides here, by `show_progress`."""
    p = Path(src).expanduser()
    if p.exists():
        if p.is_file():
            if p.suffix.lower() != ".gguf":
                raise InputError(f"{p} is a file but not a .gguf", hint="pass a model folder, a .gguf file or org/name")
            return Source("gguf", p)
        return Source("folder", p)
    if src.lower().endswith(".gguf") or "/" not in src or src.startswith((".", "/", "~")) or not HF_ID.match(src):
        raise InputError(f"{src} does not exist", hint="pass a model folder, a .gguf file or a Hugging Face id org/name")
    repo_id, _, rev = src.partition("@")
    if rev and revision and rev != revision:
        raise InputError(f"{src} names revision {rev!r} and --revision names {revision!r}",
                         hint="give the revision once: org/name@REV or --revision REV")
    return _download(repo_id, revision or rev or None, token=token, offline=offline, progress=progress)


def _download(repo_id: str, revision: str | None, *, token: str | None, offline: bool | None,
              progress: bool | None) -> Source:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                       RevisionNotFoundError, disable_progress_bars, enable_progress_bars)

    from xqcli.config import ModelConfig
    from xqcli.sources.hf import shard_files

    flag = offline
    if offline is None:
        offline = hub_cache_info()["offline"]
    (enable_progress_bars if (show_progress() if progress is None else progress) else disable_progress_bars)()
    common = dict(repo_id=repo_id, revision=revision, token=token, local_files_only=offline)
    label = f"{repo_id}{'@' + revision if revision else ''}"
    fetch_it = "download it where the hub is reachable, or pass a local folder"
    try:
        cfg_dir = Path(snapshot_download(allow_patterns=["config.json"], **common))
        if offline and not (cfg_dir / "config.json").is_file():
            raise HubError(f"{label}: its cached snapshot has no config.json and {_offline_cause(flag)}",
                           hint=fetch_it)
        ModelConfig.from_file(cfg_dir / "config.json")  # unsupported architectures stop here
        folder = Path(snapshot_download(allow_patterns=ALLOW_PATTERNS, **common))
    except LocalEntryNotFoundError:
        why = f"it is not in the local Hugging Face cache and {_offline_cause(flag)}" if offline else \
            "it is not in the local cache and the hub cannot be reached"
        raise HubError(f"{label}: {why}", hint=fetch_it) from None
    except GatedRepoError:
        raise HubError(f"{repo_id} is gated", hint="accept its license on the hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo_id} not found on the hub (or private)", hint="check the id; set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo_id}: revision {revision!r} not found") from None
    except OSError as e:
        raise HubError(f"{repo_id}: download failed ({e})") from None
    if offline:  # a download that stopped part way: offline, its weights are as absent as an uncached model
        try:
            shard_files(folder)
        except WeightsError as e:
            raise HubError(f"{label}: its cached snapshot is incomplete ({str(e).removeprefix(f'{folder}: ')}) "
                           f"and {_offline_cause(flag)}", hint=fetch_it) from None
    return Source("hub", folder, repo_id=repo_id, revision=folder.name)
