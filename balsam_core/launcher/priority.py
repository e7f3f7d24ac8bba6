"""Idle CPU priority for the launcher's bookkeeping: the allocation's cores are the tasks'.

The leasing and reporting threads and the task watchdog run at ``SCHED_IDLE``: they get
a core when no task (nor a task being started) wants it.  With short tasks on every
core, their Python competed with the tasks themselves and slowed them, and the hot
loop then waited for those tasks to end: 2000 x ``true`` on 2 slots, 10 interleaved
rounds, 2.29 -> 2.06 s median (8 of 10 rounds faster; nice 10 instead: -2 %).

Why that cannot starve anyone for long.  A thread at idle priority that holds something
others wait for (the interpreter lock, SQLite's write lock, PostgreSQL row locks)
delays them only while every core runs something else, and whoever waits on this node
sleeps, so its core goes to the holder.  (On PostgreSQL, launchers on other nodes skip
rows a lease in progress has locked, and a report locks only this launcher's tasks.)
The hot loop, the heartbeat (which keeps the leases) and the processing worker keep
normal priority, and so do the tasks: the hot loop starts them (a process inherits the
policy of the thread that starts it; the task source, run by the idle threads, starts
none).  Where the policy is refused (a seccomp filter, another kernel) the thread just
keeps its priority.
"""

from __future__ import annotations

import os


def yield_cpu_to_tasks(pid: int = 0) -> None:
    """Run the calling thread (or the process *pid*) at ``SCHED_IDLE`` from now on (it
    cannot go back without privileges)."""
    try:
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        pass
