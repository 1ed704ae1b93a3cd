"""`xq bench`: memory and speed of every cache kind side by side, measured, with the cost model beside it.

The stages, one module each: `run` (the request, the estimate and refusal, the loop), `measure` (timers,
peaks, one cache kind on the device), `hf` (transformers' generate on the same weights), `cost` (FLOPs,
bytes and the roofline floor), `results` (what is recorded), `report` (tables, markdown, JSON, CSV,
PNG) and `gates` (`--fail-if`).
"""

from xqcli.readouts.bench.gates import METRICS, Gate, check_gates, gate_error
from xqcli.readouts.bench.hf import require_transformers
from xqcli.readouts.bench.report import CSV_FIELDS, FORMATS, plot, render, require_matplotlib, rich_view
from xqcli.readouts.bench.results import HF_KIND, SCHEMA_VERSION, BenchResult, Peaks, Row, Verdict
from xqcli.readouts.bench.run import Workload, estimate_run, run_bench
from xqcli.readouts.plan import BENCH_KINDS, parse_kinds

__all__ = ["BENCH_KINDS", "CSV_FIELDS", "FORMATS", "HF_KIND", "METRICS", "SCHEMA_VERSION", "BenchResult",
           "Gate", "Peaks", "Row", "Verdict", "Workload", "check_gates", "estimate_run", "gate_error",
           "parse_kinds", "plot", "render", "require_matplotlib", "require_transformers", "rich_view",
           "run_bench"]
