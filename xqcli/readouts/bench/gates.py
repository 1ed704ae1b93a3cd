"""`--fail-if KIND.METRIC OP NUMBER`: gates on a bench result, for CI (exit 8 when one fires)."""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Callable

from xqcli.cache.spec import CacheSpec
from xqcli.errors import GateFailed, InputError
from xqcli.readouts.bench.report import number
from xqcli.readouts.bench.results import HF_KIND, BenchResult, Row

METRICS = ("ratio", "bytes_per_token", "decode_ms", "prefill_tok_s", "peak_bytes", "max_context")
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, ">=": operator.ge, "==": operator.eq,
    "!=": operator.ne, "<": operator.lt, ">": operator.gt,
}
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?"
_GATE = re.compile(r"^\s*([a-z0-9+\-]+)\.([a-z_]+)\s*(<=|>=|==|!=|<|>)\s*(" + _NUMBER + r")\s*$")


@dataclass(frozen=True)
class Gate:
    """`--fail-if KIND.METRIC OP NUMBER`: fails when the comparison is true for any context row of KIND
    (equivalently: the gate passes only if the condition is false at every context)."""

    kind: str
    metric: str
    op: str
    value: float
    text: str

    @classmethod
    def parse(cls, text: str, kinds: list[str]) -> "Gate":
        """Read a gate against the kinds this run benchmarks (`hf` included when --hf is on)."""
        m = _GATE.match(text.lower())
        if not m:
            raise InputError(f"--fail-if {text!r}: expected KIND.METRIC OP NUMBER",
                             hint="e.g. 'xquant-4.ratio<3.5'; OP in < <= > >= == !=; "
                                  f"metrics: {', '.join(METRICS)}")
        kind, metric, op, num = m.groups()
        if kind != HF_KIND:
            kind = CacheSpec.parse(kind).name
        if kind not in kinds:
            raise InputError(f"--fail-if {text!r}: kind {kind!r} is not benchmarked in this run",
                             hint=f"benchmarked: {', '.join(kinds)}")
        if metric not in METRICS:
            raise InputError(f"--fail-if {text!r}: unknown metric {metric!r}",
                             hint=f"metrics: {', '.join(METRICS)}")
        return cls(kind, metric, op, float(num), text.strip())

    def failures(self, rows: list[Row]) -> list[str]:
        """One message per context row where the gate fires (or its metric was not measured)."""
        out = []
        for r in rows:
            if r.kind != self.kind:
                continue
            v = getattr(r, self.metric)
            if v is None:
                out.append(f"{self.text}: {self.metric} not measured at context {r.context}"
                           + (f" ({r.error})" if r.error else ""))
            elif _OPS[self.op](float(v), self.value):
                out.append(f"{self.text}: {self.kind} {self.metric} = {number(v)} at context {r.context}")
        return out


def check_gates(result: BenchResult, gates: list[Gate]) -> list[str]:
    """Every firing of every gate, in order (empty: all pass)."""
    return [msg for g in gates for msg in g.failures(result.rows)]


def gate_error(failures: list[str]) -> GateFailed:
    return GateFailed(f"{len(failures)} --fail-if gate(s) failed: " + "; ".join(failures))
