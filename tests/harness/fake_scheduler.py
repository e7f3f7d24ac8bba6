"""A tiny stand-in scheduler for the fault cases a real one cannot be made to show on
demand (refusals, a missing or hanging command, garbage status).  Everything else is
tested against the built-in ``local`` scheduler, which runs real launchers here.

Its failures are real where that is cheap: a "missing command" really execs a path that
does not exist, a "hang" really runs ``sleep`` under a subprocess timeout.
"""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from balsam_core import (
    Allocation,
    BackfillWindow,
    BatchJobSpec,
    BatchJobState,
    NodeSpec,
    PluginError,
    SchedulerJobStatus,
)


class FakeScheduler:
    """Accepts every job as QUEUED unless told otherwise.

    ``on_submit`` / ``on_status`` replace the behaviour of ``submit`` / ``status``;
    ``states`` sets what ``status`` reports per id (default: QUEUED, native "PD").
    """

    def __init__(self) -> None:
        self._ids = itertools.count(1000)
        self.submitted: list[BatchJobSpec] = []
        self.cancelled: list[str] = []
        self.states: dict[str, BatchJobState] = {}
        self.on_submit: Callable[[Path, BatchJobSpec], str] | None = None
        self.on_status: Callable[[Sequence[str]], Any] | None = None
        self.status_calls = 0

    def render_script(self, job: BatchJobSpec) -> str:
        return "#!/bin/sh\n" + " ".join(job.launcher_argv) + "\n"

    def submit(self, script: Path, job: BatchJobSpec) -> str:
        self.submitted.append(job)
        if self.on_submit is not None:
            return self.on_submit(script, job)
        scheduler_id = str(next(self._ids))
        self.states[scheduler_id] = BatchJobState.QUEUED
        return scheduler_id

    def status(self, scheduler_ids: Sequence[str]) -> Any:
        self.status_calls += 1
        if self.on_status is not None:
            return self.on_status(scheduler_ids)
        return {
            i: SchedulerJobStatus(i, self.states[i], native_state=self.states[i].value[:2])
            for i in scheduler_ids
            if i in self.states
        }

    def cancel(self, scheduler_id: str) -> None:
        self.cancelled.append(scheduler_id)
        self.states[scheduler_id] = BatchJobState.CANCELLED

    def allocation(self) -> Allocation:
        return Allocation(nodes=(NodeSpec("fake1", cpus=4),))

    def backfill_windows(self) -> list[BackfillWindow]:
        return []


def reject(message: str) -> Callable[[Path, BatchJobSpec], str]:
    """A submit that fails the way plugins report a refused job."""

    def submit(script: Path, job: BatchJobSpec) -> str:
        raise PluginError(message)

    return submit


def run_command(argv: Sequence[str], timeout: float) -> Callable[[Path, BatchJobSpec], str]:
    """A submit that really runs *argv* (raising what ``subprocess.run`` raises)."""

    def submit(script: Path, job: BatchJobSpec) -> str:
        done = subprocess.run([*argv, str(script)], capture_output=True, text=True,
                              timeout=timeout, check=True)
        return done.stdout.strip()

    return submit
