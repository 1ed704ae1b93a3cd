"""What this machine can run, as plain data (`xq doctor` renders it; its --json is docs/doctor.schema.json)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
from pathlib import Path
from typing import Any

from xqcli.cache.factory import kernels_setting
from xqcli.engine.graph import graph_setting
from xqcli.errors import InputError
from xqcli.sources.hub import hub_cache_info, token_source
from xqcli.system import available_memory, total_memory
from xqcli.texts import TEXTS, has_gensim_texts

DOCS_DIR = Path(__file__).resolve().parents[1] / "docs"  # installed with the package (pyproject package-data)
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[([^\]]*)\])?[^;]*;.*extra\s*==\s*['\"]([^'\"]+)['\"]")


def doctor_report() -> dict[str, Any]:
    """Plain data (for --json and tests); each probe guarded so one broken package doesn't hide the rest."""
    report: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        report["torch"] = torch.__version__
        cuda = torch.cuda.is_available()
        report["cuda"] = {"available": cuda}
        if cuda:
            free, total = torch.cuda.mem_get_info()
            report["cuda"] |= {
                "device": torch.cuda.get_device_name(0),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
                "free_bytes": free,
                "total_bytes": total,
                "cuda_version": torch.version.cuda,
            }
    except ImportError as e:
        report["torch"] = None
        report["cuda"] = {"available": False, "error": str(e)}
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    try:
        setting = kernels_setting()
    except InputError as e:
        setting = f"invalid: {e}"
    if setting == "off":
        kernels = "off (XQ_KERNELS=off): the pure-torch reference path is used"
    elif setting != "auto":
        kernels = setting
    elif report["triton"] is None:
        kernels = "no: triton is not installed (pure-torch reference path)"
    elif report["cuda"].get("available"):
        kernels = "yes: compiled on the GPU"
    elif interp:
        kernels = "interpreted (TRITON_INTERPRET=1): correct but slow, for tests"
    else:
        kernels = "no GPU: the pure-torch reference path is used"
    report["triton_kernels"] = f"{kernels}; decode step: {_graph_line(report['cuda'].get('available', False))}"
    try:
        source = token_source()
    except Exception as e:  # noqa: BLE001  (a broken token file or hub package must not hide the rest)
        source = f"unknown ({type(e).__name__}: {e})"
    report["hf"] = hub_cache_info() | {"token": source is not None, "token_source": source}
    report["memory"] = {"total_bytes": total_memory(), "available_bytes": available_memory()}
    report["threads"] = {"torch": _torch_threads(), "cpus": os.cpu_count(),
                         "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}
    report["extras"] = extras()
    report["eval_texts"] = [t for t in TEXTS if t == "builtin" or has_gensim_texts()]
    report["docs_dir"] = str(DOCS_DIR)
    return report


def _torch_threads() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.get_num_threads()


def extras() -> dict[str, dict[str, Any]]:
    """Each optional extra of xqcli (from the installed metadata): whether all its packages are installed, and the
    version of each (None: missing). An extra naming other extras (`dev`) includes their packages."""
    try:
        requires = importlib.metadata.requires("xqcli") or []
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return {}
    packages: dict[str, list[str]] = {}  # extra -> its own packages
    nested: dict[str, list[str]] = {}  # extra -> the extras it names (xqcli[a,b])
    for req in requires:
        m = _REQUIREMENT.match(req)
        if m:
            name, inner, extra = m.groups()
            packages.setdefault(extra, [])
            if name == "xqcli":
                nested.setdefault(extra, []).extend(n.strip() for n in (inner or "").split(",") if n.strip())
            else:
                packages[extra].append(name)
    out = {}
    for extra in packages:
        names = list(dict.fromkeys(packages[extra] + [p for e in nested.get(extra, []) for p in packages.get(e, [])]))
        versions = {name: _version(name) for name in names}
        out[extra] = {"installed": all(v is not None for v in versions.values()), "packages": versions}
    return out


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _graph_line(cuda: bool) -> str:
    """How the engine decodes on CUDA (XQ_GRAPH, `xqcli.engine.graph.graph_setting`), in words."""
    try:
        setting = graph_setting()
    except InputError as e:
        return f"invalid: {e}"
    if setting == "off":
        return "eager (XQ_GRAPH=off)"
    return "captured in a CUDA graph (XQ_GRAPH=on)" if cuda else "CUDA graph on a GPU (XQ_GRAPH=on); CPU decodes eagerly"
