"""`xq doctor`: what this machine can run (versions, CUDA device, Triton, HF cache and offline state)."""

from __future__ import annotations

import typer

from xqcli.commands._options import JsonOpt


def doctor(as_json: JsonOpt = False) -> None:
    """Show Python, torch and Triton versions, the CUDA device, whether Triton kernels can run here,
    and the Hugging Face cache location and offline state."""
    from rich.console import Console
    from rich.table import Table

    from xqcli import __version__
    from xqcli.readouts.doctor import doctor_report
    from xqcli.readouts.render import dumps
    from xqcli.units import format_bytes

    report = doctor_report()
    if as_json:
        typer.echo(dumps("doctor", report))
        return
    table = Table(title="xq doctor", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    cuda = report["cuda"]
    gpu = (f"{cuda['device']} (sm {cuda['capability']}, {format_bytes(cuda['free_bytes'])} of "
           f"{format_bytes(cuda['total_bytes'])} free)") if cuda.get("available") else "none (CPU only)"
    rows = [("xq", __version__), ("python", report["python"]), ("platform", report["platform"]),
            ("torch", report["torch"] or "NOT INSTALLED"), ("triton", report["triton"] or "not installed"),
            ("CUDA device", gpu), ("Triton kernels", report["triton_kernels"]),
            ("HF cache", report["hf"]["cache_dir"]),
            ("HF offline", "yes (HF_HUB_OFFLINE)" if report["hf"]["offline"] else "no"),
            ("HF token", "set" if report["hf"]["token"] else "not set")]
    for k, v in rows:
        table.add_row(k, str(v))
    Console().print(table)
