"""`xq doctor`: what this machine can run (versions, CUDA device, Triton, HF cache and offline state)."""

from __future__ import annotations

import json
import os
import platform

import typer


def doctor_report() -> dict:
    """Plain data (for --json and tests); each probe guarded so one broken package doesn't hide the rest."""
    report: dict = {"python": platform.python_version(), "platform": platform.platform()}
    from xqcli import __version__

    report["xq"] = __version__
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
    from xqcli.cache.kinds import kernels_setting
    from xqcli.errors import InputError

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
    from xqcli.sources.hub import hub_cache_info

    report["hf"] = hub_cache_info()
    return report


def register(app: typer.Typer) -> None:
    @app.command()
    def doctor(as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
        """Show Python, torch and Triton versions, the CUDA device, whether Triton kernels can run here,
        and the Hugging Face cache location and offline state."""
        report = doctor_report()
        if as_json:
            typer.echo(json.dumps(report, indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title="xq doctor", show_header=False)
        table.add_column(style="bold")
        table.add_column()
        cuda = report["cuda"]
        gpu = (f"{cuda['device']} (sm {cuda['capability']}, {cuda['free_bytes'] / 2**30:.1f} of "
               f"{cuda['total_bytes'] / 2**30:.1f} GiB free)") if cuda.get("available") else "none (CPU only)"
        rows = [("xq", report["xq"]), ("python", report["python"]), ("platform", report["platform"]),
                ("torch", report["torch"] or "NOT INSTALLED"), ("triton", report["triton"] or "not installed"),
                ("CUDA device", gpu), ("Triton kernels", report["triton_kernels"]),
                ("HF cache", report["hf"]["cache_dir"]),
                ("HF offline", "yes (HF_HUB_OFFLINE)" if report["hf"]["offline"] else "no"),
                ("HF token", "set" if report["hf"]["token"] else "not set")]
        for k, v in rows:
            table.add_row(k, str(v))
        Console().print(table)
