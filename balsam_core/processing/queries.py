"""The SQL the processor runs: claimed rows as :class:`_Item`, lease updates, the leases
still held, and the parents' working directories."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, update

from ..models import Task, TaskDependency, workdir_of
from ..states import State
from ..taskspec import task_environment
from ..transitions import chunks
from .items import _Item


def _item(row: Any) -> _Item:
    env = task_environment(row.app_environment, row.environment)
    return _Item(
        id=row.id,
        state=State(row.state),
        state_time=row.state_time,
        workdir=workdir_of(row),
        return_code=row.return_code,
        num_retries=row.num_retries,
        max_retries=row.max_retries,
        post_error_handler=row.post_error_handler,
        post_timeout_handler=row.post_timeout_handler,
        auto_timeout_retry=row.auto_timeout_retry,
        input_files=list(row.input_files or []),
        stage_in=list(row.stage_in or []),
        stage_out=list(row.stage_out or []),
        env=env,
        preprocess=list(row.preprocess) if row.preprocess else None,
        postprocess=list(row.postprocess) if row.postprocess else None,
        leased=row.lease_launcher_id is not None or row.lease_expires is not None,
    )


def _set_lease(session: Any, ids: Sequence[int], owner: int | None, expires: float | None) -> None:
    for part in chunks(sorted(ids)):
        session.execute(
            update(Task)
            .where(Task.id.in_(part))
            .values(lease_launcher_id=owner, lease_expires=expires)
            .execution_options(synchronize_session=False)
        )


def _held(session: Any, ids: Sequence[int], owner: int) -> dict[int, State]:
    """``{id: state}`` of *ids* still leased to *owner* (row-locked on PostgreSQL)."""
    result: dict[int, State] = {}
    pg = session.get_bind().dialect.name == "postgresql"
    for part in chunks(sorted(set(ids))):
        query = select(Task.id, Task.state).where(
            Task.id.in_(part), Task.lease_launcher_id == owner
        )
        if pg:
            query = query.with_for_update()
        result.update((i, State(s)) for i, s in session.execute(query))
    return result


def _parent_dirs(session: Any, child_ids: Sequence[int]) -> dict[int, list[tuple[int, str]]]:
    """``{child: [(parent id, parent workdir relative to data/), ...]}`` by parent id."""
    result: dict[int, list[tuple[int, str]]] = {}
    for part in chunks(child_ids):
        rows = session.execute(
            select(TaskDependency.child_id, Task.id, Task.name, Task.workflow, Task.workdir)
            .join(Task, Task.id == TaskDependency.parent_id)
            .where(TaskDependency.child_id.in_(part))
            .order_by(TaskDependency.child_id, Task.id)
        )
        for row in rows:
            rel = workdir_of(row)
            result.setdefault(row.child_id, []).append((row.id, rel))
    return result
