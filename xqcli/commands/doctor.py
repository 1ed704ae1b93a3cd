"""`xq doctor`: what this machine can run (versions, CUDA device, Triton, HF cache and offline state)."""

from __future__ import annotations

import typer

from xqcli.commands._options import JsonOpt

EXAMPLES = ('xq doctor',
            'xq doctor --json')


def doctor(as_json: JsonOpt = False) -> None:
    """Show Python, torch and Triton versions, the CUDA device, whether Triton kernels can run here, RAM and
    threads, the installed extras, the Hugging Face cache, offline state and token (where it was found, never
    the token), and the folder of the documents the help texts cite."""
    from rich.console import Console

    from xqcli import __version__
    from xqcli.readouts.doctor import doctor_report
    from xqcli.readouts.render import dumps, key_value_table, show
    from xqcli.units import format_bytes

    report = doctor_report()
    if as_json:
        typer.echo(dumps("doctor", report))
        return
    cuda, hf, mem, threads = report["cuda"], report["hf"], report["memory"], report["threads"]
    gpu = (f"{cuda['device']} (sm {cuda['capability']}, {format_bytes(cuda['free_bytes'])} of "
           f"{format_bytes(cuda['total_bytes'])} free)") if cuda.get("available") else "none (CPU only)"
    size = lambda n: "unknown" if n is None else format_bytes(n)  # noqa: E731
    extras = ", ".join(f"{name} {'yes' if e['installed'] else 'no'}" + (
        "" if e["installed"] else f" (missing {', '.join(p for p, v in e['packages'].items() if v is None)})")
        for name, e in report["extras"].items()) or "unknown (xqcli is not installed)"
    rows = [("xq", __version__), ("python", report["python"]), ("platform", report["platform"]),
            ("torch", report["torch"] or "NOT INSTALLED"), ("triton", report["triton"] or "not installed"),
            ("CUDA device", gpu), ("Triton kernels", report["triton_kernels"]),
            ("RAM", f"{size(mem['available_bytes'])} available of {size(mem['total_bytes'])}"),
            ("threads", f"torch {threads['torch']}, CPUs {threads['cpus']} ({threads['usable_cpus']} usable here)"),
            ("extras", extras), ("eval texts", ", ".join(report["eval_texts"])),
            ("HF cache", hf["cache_dir"]),
            ("HF offline", "yes (HF_HUB_OFFLINE)" if hf["offline"] else "no"),
            ("HF token", f"set (from {hf['token_source']})" if hf["token"] else "not set (public models only)"),
            ("docs", report["docs_dir"])]
    show(Console(highlight=False), key_value_table("xq doctor", [(k, str(v)) for k, v in rows]))
