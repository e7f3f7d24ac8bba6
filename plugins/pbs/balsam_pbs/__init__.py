"""Balsam scheduler plugin for PBS Pro / OpenPBS and Torque: ``[scheduler] use = "pbs"``,
settings in ``[plugins.pbs]``.  See :mod:`balsam_pbs.scheduler` and ``docs/schedulers.md``.
"""

from __future__ import annotations

from balsam_core import SchedulerPlugin, hookimpl

from .scheduler import NATIVE_STATES, PbsScheduler, PbsSettings

__all__ = ["NATIVE_STATES", "PbsScheduler", "PbsSettings", "balsam_schedulers"]


@hookimpl
def balsam_schedulers() -> list[SchedulerPlugin]:
    """The ``pbs`` scheduler record."""
    return [
        SchedulerPlugin(
            "pbs",
            PbsScheduler.from_context,
            "PBS Pro / Torque: qsub / qstat / qdel; nodes from PBS_NODEFILE",
            settings=PbsSettings,
        )
    ]
