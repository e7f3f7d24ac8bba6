"""Balsam scheduler plugin for Slurm: ``[scheduler] use = "slurm"``, settings in ``[plugins.slurm]``.

See :mod:`balsam_slurm.scheduler` and ``docs/schedulers.md``.
"""

from __future__ import annotations

from balsam_core import SchedulerPlugin, hookimpl

from .scheduler import NATIVE_STATES, SlurmScheduler, SlurmSettings

__all__ = ["NATIVE_STATES", "SlurmScheduler", "SlurmSettings", "balsam_schedulers"]


@hookimpl
def balsam_schedulers() -> list[SchedulerPlugin]:
    """The ``slurm`` scheduler record."""
    return [
        SchedulerPlugin(
            "slurm",
            SlurmScheduler.from_context,
            "Slurm: sbatch / squeue + sacct / scancel; nodes from SLURM_JOB_NODELIST",
            settings=SlurmSettings,
        )
    ]
