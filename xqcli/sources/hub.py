"""Resolve a model source (local folder, `.gguf` file, or Hugging Face id `org/name[@revision]`).

This is the only module that imports huggingface_hub. Downloads fetch only the files xq needs, and
`config.json` is fetched and checked first, so an unsupported architecture fails before any weight
download.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from xqcli.errors import HubError, InputError

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
    return {"cache_dir": cache, "offline": offline, "token": bool(os.environ.get("HF_TOKEN"))}


def resolve(src: str, *, revision: str | None = None, token: str | None = None, offline: bool | None = None,
            progress: bool = False) -> Source:
    """A local `.gguf` or folder is used as is; anything shaped like `org/name[@rev]` goes to the hub."""
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
    return _download(repo_id, revision or rev or None, token=token, offline=offline, progress=progress)


def _download(repo_id: str, revision: str | None, *, token: str | None, offline: bool | None,
              progress: bool) -> Source:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                       RevisionNotFoundError, disable_progress_bars, enable_progress_bars)

    from xqcli.config import ModelConfig

    if offline is None:
        offline = hub_cache_info()["offline"]
    (enable_progress_bars if progress else disable_progress_bars)()
    common = dict(repo_id=repo_id, revision=revision, token=token or os.environ.get("HF_TOKEN"),
                  local_files_only=offline)
    try:
        cfg_dir = Path(snapshot_download(allow_patterns=["config.json"], **common))
        ModelConfig.from_file(cfg_dir / "config.json")  # unsupported architectures stop here
        folder = Path(snapshot_download(allow_patterns=ALLOW_PATTERNS, **common))
    except LocalEntryNotFoundError:
        why = "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set" if offline else \
            "it is not in the local cache and the hub cannot be reached"
        raise HubError(f"{repo_id}{'@' + revision if revision else ''}: {why}",
                       hint="download it where the hub is reachable, or pass a local folder") from None
    except GatedRepoError:
        raise HubError(f"{repo_id} is gated", hint="accept its license on the hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo_id} not found on the hub (or private)", hint="check the id; set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo_id}: revision {revision!r} not found") from None
    except OSError as e:
        raise HubError(f"{repo_id}: download failed ({e})") from None
    return Source("hub", folder, repo_id=repo_id, revision=folder.name)
