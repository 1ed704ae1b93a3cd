"""lm-eval's task index, whose datasets' hub failures are xq's exit 5 with the fix, not an internal error.

lm-eval downloads a task's dataset (`datasets.load_dataset`) when it builds the task, inside `TaskManager.load`
(which `lm_eval.simple_evaluate` calls): offline with the dataset not cached, `datasets` raises a plain
`ConnectionError` ("Couldn't reach 'allenai/ai2_arc' on the Hub (OfflineModeIsEnabled)"). Importing this module
imports lm_eval (call `xqcli.lmeval.require_lm_eval` first for a clean exit 6).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from datasets.exceptions import DatasetNotFoundError
from huggingface_hub.errors import LocalEntryNotFoundError
from lm_eval.tasks import TaskManager

from xqcli.errors import HubError

_QUOTED = re.compile(r"'([^'\s]+)'")  # the dataset id in "Couldn't reach 'org/name' on the Hub"
ONLINE_HINT = ("run it once where the hub is reachable (--online, or HF_HUB_OFFLINE=0 with HF_DATASETS_OFFLINE "
               "unset) to cache the dataset; later runs work offline")


def dataset_error(error: Exception, tasks: Sequence[str]) -> HubError:
    """The exit-5 error for a task dataset `datasets` could not get: the dataset it names (else the tasks), why, fix."""
    from datasets import config

    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    named = _QUOTED.search(first)
    what = f"dataset {named.group(1)}" if named else "dataset"
    tasks_named = f"lm-eval task{'s' if len(tasks) > 1 else ''} {', '.join(tasks)}"
    if isinstance(error, DatasetNotFoundError):
        return HubError(f"{tasks_named}: the {what} was not found on the hub, or is gated ({first})",
                        hint="check the task's dataset_path; for a gated dataset accept its terms and set HF_TOKEN")
    where = ("HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set" if config.HF_HUB_OFFLINE
             else "the hub cannot be reached")
    return HubError(f"{tasks_named}: the {what} is not in the local cache and {where} ({first})", hint=ONLINE_HINT)


class HubAwareTaskManager(TaskManager):
    """lm-eval's `TaskManager` whose `load` turns the datasets' offline / not-found errors into `HubError`."""

    def load(self, task_list: Any) -> Any:
        try:
            return super().load(task_list)
        except (ConnectionError, LocalEntryNotFoundError, DatasetNotFoundError) as e:
            names = [task_list] if isinstance(task_list, str) else [str(t) for t in task_list]
            raise dataset_error(e, names) from None
