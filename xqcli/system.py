"""What the machine and this process have: memory (Linux and macOS) and the source checkout's git commit.

One place for these lookups, so readouts agree and units are right everywhere (Linux reports
`ru_maxrss` in KiB, macOS in bytes; /proc exists only on Linux).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def process_memory() -> tuple[int | None, int | None]:
    """(current RSS, peak RSS) of this process in bytes; None where the platform does not say."""
    rss = peak = None
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        raw = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = raw if sys.platform == "darwin" else raw * 1024  # bytes on macOS, KiB on Linux
    except (ImportError, OSError):
        pass
    if rss is not None and peak is not None:
        peak = max(peak, rss)  # the peak is never below the current size
    return rss, peak


def _proc_kib(path: str, key: str) -> int | None:
    """`key: N kB` from a Linux /proc file, in bytes; None elsewhere or when absent."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_since_reset() -> int | None:
    """The process peak RSS (VmHWM) since the last `reset_peak_rss`, in bytes (Linux only)."""
    return _proc_kib("/proc/self/status", "VmHWM")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux /proc/self/clear_refs); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def available_memory() -> int | None:
    """Memory that can be allocated without swapping: MemAvailable on Linux, free+inactive pages on macOS."""
    avail = _proc_kib("/proc/meminfo", "MemAvailable")
    if avail is not None:
        return avail
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5, check=True).stdout
            page = int(out.split("page size of")[1].split()[0])
            pages = {k.strip(): int(v.strip().rstrip(".")) for k, v in
                     (line.split(":", 1) for line in out.splitlines()[1:] if ":" in line)}
            return page * (pages.get("Pages free", 0) + pages.get("Pages inactive", 0))
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None
    return None


def total_memory() -> int | None:
    """Physical memory in bytes."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def git_commit(path: Path | None = None) -> tuple[str | None, bool | None]:
    """(HEAD commit, dirty?) of the checkout holding `path` (default: this package), (None, None) outside one."""
    root = Path(path or __file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None, None
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip() != ""
        return rev or None, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None
