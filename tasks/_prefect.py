"""Small helpers every task module shares: the right logger, whether a run is active, retry policy."""

from __future__ import annotations

import logging
from typing import Any

from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.context import FlowRunContext, TaskRunContext
from prefect.states import State

from flywheel.errors import FlywheelError


def in_run() -> bool:
    """True inside a Prefect flow or task run (not when tests call a task's `.fn`)."""
    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def run_logger(name: str) -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The run logger inside a Prefect run (its lines show in the UI), a plain logger under `.fn`."""
    if in_run():
        from prefect import get_run_logger

        return get_run_logger()
    return logging.getLogger(name)


def retry_transient(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry I/O hiccups, not our own verdicts (integrity, missing alias, bad data): those will not heal."""
    try:
        state.result(raise_on_failure=True)
    except FlywheelError:
        return False
    except Exception:
        return True
    return False
