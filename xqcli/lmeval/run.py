"""`xq eval --tasks`: lm-eval tasks for each cache kind on one loaded model, as rows of lm-eval's own metrics."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from xqcli.cache.spec import CacheSpec
from xqcli.errors import InputError
from xqcli.lmeval import require_lm_eval
from xqcli.load import Loaded
from xqcli.readouts.render import Column, TableData, table


@dataclass(frozen=True)
class TaskScore:
    """One metric of one task for one cache kind, as lm-eval reports it (`stderr` None where it gives none)."""

    task: str
    metric: str
    filter: str
    cache: str
    value: float
    stderr: float | None
    samples: int

    def as_dict(self) -> dict:
        return asdict(self)


def _number(value: object) -> float | None:
    """lm-eval writes "N/A" for a stderr it could not compute; NaN is no number either (not JSON)."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def task_scores(results: dict, cache: str) -> list[TaskScore]:
    """Rows of lm-eval's `results` dict ({task: {"metric,filter": value, "metric_stderr,filter": ...}})."""
    rows = []
    for task, metrics in sorted(results["results"].items()):
        n = results.get("n-samples", {}).get(task, {})
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or _number(value) is None:
                continue
            metric, flt = key.split(",", 1)
            rows.append(TaskScore(task, metric, flt, cache, float(value),
                                  _number(metrics.get(f"{metric}_stderr,{flt}")), int(n.get("effective", 0))))
    return rows


def task_manager(include: Path | None):
    """lm-eval's task index, with a folder of local task YAML files when given (checked here: exit 2); a task's
    dataset that cannot be had from the hub is exit 5 (`HubAwareTaskManager`)."""
    from xqcli.lmeval.tasks import HubAwareTaskManager

    if include is not None and not Path(include).is_dir():
        raise InputError(f"--include {include}: not a folder of lm-eval task YAML files")
    return HubAwareTaskManager(include_path=str(include) if include is not None else None)


def run_tasks(loaded: Loaded, specs: Sequence[CacheSpec], tasks: Sequence[str], *, include: Path | None = None,
              limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 8, seed: int = 1234,
              progress: Callable[[int, int, str], None] | None = None) -> list[TaskScore]:
    """Every task for every cache kind (an `XQLM` per kind on the same loaded model), lm-eval's metrics and
    stderr, in spec order. Unknown task names are refused before any model work (exit 2)."""
    require_lm_eval()
    import lm_eval

    from xqcli.lmeval.model import XQLM

    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its INFO lines would bury the table on stderr
    manager = task_manager(include)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise InputError(f"unknown lm-eval task(s): {', '.join(unknown)}",
                         hint="see `lm_eval ls tasks`; local YAML tasks need --include FOLDER")
    rows: list[TaskScore] = []
    for i, spec in enumerate(specs):
        if progress:
            progress(i, len(specs), spec.name)
        lm = XQLM(loaded=loaded, cache=spec, batch_size=batch_size)
        results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                          num_fewshot=num_fewshot, log_samples=False, random_seed=seed,
                                          numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                          bootstrap_iters=1000)
        rows += task_scores(results, spec.name)
    if progress:
        progress(len(specs), len(specs), "")
    return rows


def task_table(rows: Sequence[TaskScore], title: str) -> TableData:
    """A row per (task, metric, filter), a column per cache kind: "value ± stderr" as lm-eval reports them; CSV
    has the value and its stderr as two numbers per cache kind."""
    caches = list(dict.fromkeys(r.cache for r in rows))
    cells: dict[tuple[str, str, str], list[tuple[float, float | None] | None]] = {}
    for r in rows:
        row = cells.setdefault((r.task, r.metric, r.filter), [None] * len(caches))
        row[caches.index(r.cache)] = (r.value, r.stderr)
    values = [[task, metric if flt == "none" else f"{metric} ({flt})",
               max(r.samples for r in rows if r.task == task), *scores] for (task, metric, flt), scores in cells.items()]
    columns = [Column("task", numeric=False), Column("metric", numeric=False), Column("n")]
    columns += [Column(c, _score, csv=(c, f"{c} stderr")) for c in caches]
    return table(columns, values, title=title)


def _score(value: tuple[float, float | None]) -> str:
    """lm-eval's "value ± stderr" (no stderr: the value alone)."""
    score, stderr = value
    return f"{score:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")
