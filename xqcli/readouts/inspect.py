"""What `xq inspect` (and `xq convert`'s closing summary) shows about a bundle, as plain data."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from xqcli.bundle.format import Bundle
from xqcli.cache.spec import uses_latents
from xqcli.readouts.plan import PLAN_KINDS, plan


def bundle_report(bundle: Bundle, verified: bool = False) -> dict[str, Any]:
    """Manifest facts, files, bytes per token of the default kinds, and the calibration record.

    The bundle's own format and writer versions are `bundle_schema_version` and `bundle_xq_version`: the
    JSON envelope's `schema_version` and `xq_version` describe the report (`xqcli.readouts.render`)."""
    m = bundle.manifest
    rows = plan(bundle.config, list(PLAN_KINDS), include_weights=False)
    return {"bundle": str(bundle.path), "verified": verified,
            "bundle_schema_version": m["schema_version"], "bundle_xq_version": m["xq_version"], "source": m["source"],
            "dtype": m["dtype"], "config": bundle.config.to_dict(), "latents": uses_latents(bundle.config),
            "cache_defaults": m.get("cache_defaults"),
            "files": [asdict(f) for f in bundle.files.values()],
            "total_bytes": sum(f.size for f in bundle.files.values()),
            "bytes_per_token": [{"kind": r.kind, "bytes_per_token": r.bytes_per_token,
                                 "vs_fp16_kv": r.normalized} for r in rows],
            "calibration": bundle.calibration()}
