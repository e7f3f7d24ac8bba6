"""Balsam scheduler plugin for Cobalt: ``[scheduler] use = "cobalt"``, settings in
``[plugins.cobalt]``.  See :mod:`balsam_cobalt.scheduler` and ``docs/schedulers.md``.
"""

from __future__ import annotations

from balsam_core import SchedulerPlugin, hookimpl

from .scheduler import NATIVE_STATES, CobaltScheduler, CobaltSettings

__all__ = ["NATIVE_STATES", "CobaltScheduler", "CobaltSettings", "balsam_schedulers"]


@hookimpl
def balsam_schedulers() -> list[SchedulerPlugin]:
    """The ``cobalt`` scheduler record."""
    return [
        SchedulerPlugin(
            "cobalt",
            CobaltScheduler.from_context,
            "Cobalt: qsub / qstat / qdel; nodes from COBALT_PARTNAME",
            settings=CobaltSettings,
        )
    ]
