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


def store_unavailable(exc: BaseException | None) -> bool:
    """True when `exc` (or what caused it) says a database went away or refused the connection: a restart, a
    fail-over, a dropped connection. Those heal; a constraint, a missing table or bad data does not."""
    import sqlalchemy as sa

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
            return True
        if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
            return True
        if getattr(exc, "error_code", None) == "TEMPORARILY_UNAVAILABLE":  # MLflow's SQL store, on OperationalError
            return True
        if type(exc).__module__.startswith("psycopg") and type(exc).__name__ in ("OperationalError", "InterfaceError"):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def retry_store_unavailable(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry a task only when a database was unavailable (tasks whose other failures must not be repeated,
    such as training, which would redo its search)."""
    try:
        state.result(raise_on_failure=True)
    except Exception as exc:
        return store_unavailable(exc)
    return False
