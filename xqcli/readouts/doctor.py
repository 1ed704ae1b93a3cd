"""What this machine can run, as plain data (`xq doctor` renders it; its --json is docs/doctor.schema.json)."""

from __future__ import annotations

import os
import platform
from typing import Any

from xqcli.cache.factory import kernels_setting
from xqcli.errors import InputError
from xqcli.sources.hub import hub_cache_info


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
    report["triton_kernels"] = kernels
    report["hf"] = hub_cache_info()
    return report
