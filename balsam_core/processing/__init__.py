"""Pre/post-processing, stage-in/out and error recovery, outside the launcher's hot loop.

DESIGN §6: a :class:`TransitionProcessor` moves tasks through the states around a run —
READY -> STAGED_IN -> PREPROCESSED before it, RUN_DONE -> POSTPROCESSED -> JOB_FINISHED
after it, and RUN_ERROR / RUN_TIMEOUT through the recovery chain — so that the launcher
only ever starts, watches and reports processes.  The launcher's worker process
(:mod:`balsam_core.launcher.worker`) calls :meth:`TransitionProcessor.process_once` in a loop; tests and
``balsam`` commands call it directly::

    proc = TransitionProcessor(site, None, owner_id=launcher_id)   # None: the site's chain
    while proc.process_once(wait=True):
        pass
    proc.close()

Modules (one job each):

* :mod:`.processor` -- :class:`TransitionProcessor`: the pass (harvest, claim with
  fast-forward, recovery, work submission) and recording results under the lease.
* :mod:`.recovery` -- the recovery chain for RUN_ERROR / RUN_TIMEOUT: decisions,
  retry delays, per-task max_retries.
* :mod:`.steps` -- pre/postprocess and error/timeout handlers as subprocesses, log tails.
* :mod:`.staging` -- input_files, stage_in and stage_out: path checks against the site's
  ``data/`` and allowed roots, copying.
* :mod:`.queries` -- the SQL the processor runs (claimed rows, trivial tasks, leases,
  parents).
* :mod:`.items` -- plain data passed between them (a claimed task, a pool job's outcome).
"""

from .processor import TransitionProcessor
from .recovery import site_policies
from .steps import ERROR_ENV, TIMEOUT_ENV

__all__ = [
    "ERROR_ENV",
    "TIMEOUT_ENV",
    "TransitionProcessor",
    "site_policies",
]
