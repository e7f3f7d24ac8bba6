"""The launcher's leasing thread and its working-directory preparation, on their own."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from balsam_core.errors import BalsamError, DatabaseError
from balsam_core.launcher.leasing import Leaser, LeaseResult
from balsam_core.launcher.workdirs import Workdirs
from balsam_core.plugin_types import LeasedTask, NodeResources, TaskRequirements
from balsam_core.states import State

FREE = [NodeResources("n1", 4, ())]


def leased(task_id: int, workdir: str) -> LeasedTask:
    return LeasedTask(
        task_id=task_id, name="t", workflow="wf", argv=("true",), workdir=workdir, env={},
        requirements=TaskRequirements(task_id=task_id), state=State.PREPROCESSED,
    )


class Source:
    """A task source whose lease returns what the test queued (or raises it)."""

    def __init__(self, *outcomes: Sequence[LeasedTask] | BaseException) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[tuple[int, list[NodeResources], int]] = []

    def lease(
        self, launcher_id: int, free: list[NodeResources], limit: int
    ) -> Sequence[LeasedTask]:
        self.calls.append((launcher_id, free, limit))
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def wait_result(leaser: Leaser, woken: threading.Event) -> LeaseResult:
    assert woken.wait(10)
    woken.clear()
    result = leaser.take()
    assert result is not None
    return result


def test_leaser_hands_over_leases_and_prepares_their_directories() -> None:
    woken, prepared = threading.Event(), []
    source = Source([leased(1, "wf/a"), leased(2, "wf/b")], DatabaseError("db away"))
    leaser = Leaser(source, 7, woken.set, prepared.append)  # type: ignore[arg-type]
    try:
        assert leaser.take() is None and not leaser.busy
        leaser.request(FREE, 5)
        assert leaser.busy
        leaser.request(FREE, 99)  # ignored while one is in flight
        result = wait_result(leaser, woken)
        assert [t.task_id for t in result.tasks] == [1, 2] and result.error is None
        assert not leaser.busy
        leaser.request(FREE, 3)
        failed = wait_result(leaser, woken)
        assert failed.tasks == () and isinstance(failed.error, DatabaseError)
        assert [(lid, limit) for lid, _, limit in source.calls] == [(7, 5), (7, 3)]
    finally:
        leaser.close(timeout=10)
    assert prepared == ["wf/a", "wf/b"]


def test_a_bug_in_the_source_reaches_the_hot_loop() -> None:
    woken = threading.Event()
    leaser = Leaser(Source(KeyError("bug")), 1, woken.set, lambda w: None)  # type: ignore[arg-type]
    leaser.request(FREE, 1)
    assert woken.wait(10)
    assert isinstance(leaser.error, KeyError)
    leaser.close(timeout=10)


def test_workdirs_are_made_inside_the_roots_only(tmp_path: Path) -> None:
    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir()
    outside.mkdir()
    workdirs = Workdirs(data, [data])

    workdirs.prepare_ahead("wf/task_1")
    made = data / "wf" / "task_1"
    assert sorted(p.name for p in made.iterdir()) == ["stderr", "stdout"]
    (made / "stdout").write_text("kept")
    assert workdirs.prepare("wf/task_1") == str(made)  # again: nothing changes
    workdirs.prepare_ahead("wf/task_1")
    assert workdirs.prepare("wf/task_1") == str(made)
    assert (made / "stdout").read_text() == "kept"

    (data / "wf" / "link").symlink_to(outside)
    for bad in ("wf/link", "../outside/x", "/tmp/elsewhere/x"):
        with pytest.raises(BalsamError, match="outside the site's data directory"):
            workdirs.prepare(bad)
    assert list(outside.iterdir()) == []
    assert not Path("/tmp/elsewhere").exists()
