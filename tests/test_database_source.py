"""The built-in ``database`` task source: leases (exactly once), reports, heartbeats,
release and lease expiry, on SQLite and PostgreSQL."""

from __future__ import annotations

import random
import threading
import time
from collections import namedtuple
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from sqlalchemy import select, update

from balsam_core import (
    LauncherInfo,
    LeasedTask,
    NodeResources,
    RawSql,
    StateUpdate,
    TaskRequirements,
)
from balsam_core.api import Site
from balsam_core.builtin import database_source
from balsam_core.builtin.database_source import DatabaseTaskSource, fitting, requirements
from balsam_core.models import BatchJob, Launcher, Task, TaskEvent
from balsam_core.states import State
from balsam_core.transitions import Change

S = State
NODE = NodeResources("n1", cpus=8, gpu_ids=(0, 1))
#: Room for every task these tests lease at once (one whole node each).
ROOM = [NODE] * 16


@pytest.fixture
def source(site: Site) -> Iterator[DatabaseTaskSource]:
    src = site.plugins.create("task_source", "database", site.config)
    assert isinstance(src, DatabaseTaskSource)
    yield src
    src.site.db.dispose()


def info(**kw: object) -> LauncherInfo:
    return LauncherInfo(host="node01", pid=4242, **kw)  # type: ignore[arg-type]


def runnable(site: Site, ids: Sequence[int]) -> None:
    """READY -> STAGED_IN -> PREPROCESSED: what the processing side does before a launch."""
    site.transition(
        [Change(i, S.STAGED_IN) for i in ids] + [Change(i, S.PREPROCESSED) for i in ids]
    )


def add_runnable(site: Site, n: int, **spec: object) -> list[int]:
    ids = site.add_tasks([{"command": f"./run {i}", **spec} for i in range(n)])
    runnable(site, ids)
    return ids


def lease_of(site: Site, task_id: int) -> tuple[int | None, float | None]:
    with site.db.session() as s:
        row = s.execute(
            select(Task.lease_launcher_id, Task.lease_expires).where(Task.id == task_id)
        ).one()
    return row[0], row[1]


def set_lease_expires(site: Site, ids: Sequence[int], when: float) -> None:
    with site.db.session(write=True) as s:
        s.execute(update(Task).where(Task.id.in_(list(ids))).values(lease_expires=when))


def ids_of(leased: Sequence[LeasedTask]) -> list[int]:
    return [t.task_id for t in leased]


# --------------------------------------------------------------------------- register / lease


def test_register_and_lease(site: Site, source: DatabaseTaskSource) -> None:
    lid = source.register(info(mode="serial"))
    other = source.register(info())
    assert isinstance(lid, int) and other != lid
    with site.db.session() as s:
        row = s.get(Launcher, lid)
        assert (row.host, row.pid, row.mode, row.stopped) == ("node01", 4242, "serial", None)

    site.add_app(
        "sim", ["sim", "--temp", "{temp}", "--label={label}"], environment={"A": "app", "B": "app"}
    )
    t_app = site.add_task(
        app="sim", parameters={"temp": 300, "label": "x y; rm -rf /"},
        environment={"B": "task", "C": "c"}, ranks_per_node=2, threads_per_rank=2,
        wall_time_min=5, mpi_flags=["--bind-to", "core"], post_error_handler=True,
    ).id
    t_cmd = site.add_task(
        command=["./run", "$(id)"], environment={"X": "1"}, workdir="custom/dir"
    ).id
    plain = site.add_tasks([{"command": "./p"}] * 4)
    not_yet = site.add_task(command="./ready-only", input_files=["*.dat"]).id  # to stage in
    runnable(site, [t_app, t_cmd, *plain])
    restart = site.add_task(command="./again").id
    runnable(site, [restart])
    site.transition([Change(restart, S.RUNNING), Change(restart, S.RUN_ERROR)])
    site.retry(restart)  # RESTART_READY: runnable

    assert source.lease(lid, ROOM, 0) == []
    assert source.lease(lid, [], 10) == []
    first = source.lease(lid, ROOM, 3)
    assert ids_of(first) == [t_app, t_cmd, plain[0]]

    a = first[0]
    assert a.argv == ("sim", "--temp", "300", "--label=x y; rm -rf /")
    assert dict(a.env) == {"A": "app", "B": "task", "C": "c"}
    assert (a.name, a.workflow, a.workdir, a.state) == (
        "sim", "default", f"default/sim_{t_app}", S.PREPROCESSED
    )
    assert a.mpi_flags == ("--bind-to", "core") and a.post_error_handler is True
    assert a.requirements == TaskRequirements(
        task_id=t_app, num_nodes=1, ranks_per_node=2, threads_per_rank=2, gpus_per_rank=0,
        node_packing_count=1, wall_time_min=5.0, ready_since=a.requirements.ready_since,
    )
    assert a.requirements.ready_since > 0
    c = first[1]
    assert (c.argv, dict(c.env), c.workdir) == (("./run", "$(id)"), {"X": "1"}, "custom/dir")

    # No time of its own: the lease lasts as long as the launcher's heartbeat.
    assert lease_of(site, t_app) == (lid, None)

    rest = source.lease(lid, ROOM, 100)
    assert ids_of(rest) == [*plain[1:], restart]
    assert rest[-1].state is S.RESTART_READY
    assert source.lease(lid, ROOM, 100) == []
    assert source.lease(other, ROOM, 100) == []
    assert lease_of(site, not_yet) == (None, None)


def test_lease_filters_by_resources_workflow_and_tags(
    site: Site, source: DatabaseTaskSource
) -> None:
    lid = source.register(info())
    two_nodes, many_cpus, many_gpus, small = (
        add_runnable(site, 1, num_nodes=2)[0],
        add_runnable(site, 1, ranks_per_node=4, threads_per_rank=4)[0],  # 16 cpus per node
        add_runnable(site, 1, ranks_per_node=2, gpus_per_rank=2)[0],  # 4 gpus per node
        add_runnable(site, 1, ranks_per_node=8)[0],
    )
    busy = NodeResources("n2", cpus=8, gpu_ids=(0, 1), free_fraction=0.5)
    assert ids_of(source.lease(lid, [NODE, busy], 10)) == [small]
    for t in (two_nodes, many_cpus, many_gpus):
        assert lease_of(site, t) == (None, None)
    big = [NodeResources(f"b{i}", cpus=16, gpu_ids=(0, 1, 2, 3)) for i in range(2)]
    assert ids_of(source.lease(lid, big[:1], 10)) == [many_cpus]  # one node: one of them
    assert ids_of(source.lease(lid, big, 10)) == [two_nodes]  # takes both nodes
    assert ids_of(source.lease(lid, big[:1], 10)) == [many_gpus]

    # Workflow and tags of the LauncherInfo filter what it gets (several tags: all match).
    t1 = add_runnable(site, 1, workflow="w1", tags={"a": "1", "b": "2"})[0]
    t2 = add_runnable(site, 1, workflow="w1", tags={"a": "1"})[0]
    t3 = add_runnable(site, 1, workflow="w2", tags={"a": "1", "b": "2"})[0]
    t4 = add_runnable(site, 1, workflow="w2")[0]
    by_tags = source.register(info(tags={"a": "1", "b": "2"}))
    by_workflow = source.register(info(workflow="w1"))
    both = source.register(info(workflow="w2", tags={"b": "2"}))
    anyone = source.register(info())
    assert ids_of(source.lease(by_tags, ROOM, 10)) == [t1, t3]
    assert ids_of(source.lease(by_workflow, ROOM, 10)) == [t2]
    assert source.lease(both, ROOM, 10) == []
    assert ids_of(source.lease(anyone, ROOM, 10)) == [t4]


def test_lease_gives_only_what_fits_together(site: Site, source: DatabaseTaskSource) -> None:
    """A launcher is not handed tasks it has no room for (another one may have)."""
    lid = source.register(info())
    halves = add_runnable(site, 5, node_packing_count=2)
    whole = add_runnable(site, 1)
    node = NodeResources("n1", cpus=8)
    assert ids_of(source.lease(lid, [node], 10)) == halves[:2]
    half_free = NodeResources("n1", cpus=7, free_fraction=0.5)
    assert ids_of(source.lease(lid, [half_free, node], 10)) == halves[2:5]
    assert source.lease(lid, [half_free], 10) == []  # the whole-node task waits
    assert ids_of(source.lease(lid, [node], 10)) == whole
    # the same node listed twice is room ahead, not a second node
    pair = add_runnable(site, 1, num_nodes=2)
    assert source.lease(lid, [node, node], 10) == []
    assert ids_of(source.lease(lid, [node, NodeResources("n2", cpus=8)], 10)) == pair


Row = namedtuple(
    "Row", "id num_nodes ranks_per_node threads_per_rank gpus_per_rank node_packing_count"
    " wall_time_min state_time",
)


def first_fit(rows: Sequence[Row], free: Sequence[NodeResources]) -> list[int]:
    """What ``fitting`` picks, the plain way: every task against every node, in order."""
    left = [[n.name, n.cpus, len(n.gpu_ids), n.free_fraction] for n in free]
    chosen = []
    for row in rows:
        req = requirements(row)
        room: dict[str, list] = {}
        for node in left:
            if (
                node[1] >= req.cpus_per_node and node[2] >= req.gpus_per_node
                and node[3] >= req.node_fraction - 1e-9 and len(room) < req.num_nodes
            ):
                room.setdefault(node[0], node)
        if len(room) == req.num_nodes:
            for node in room.values():
                node[1] -= req.cpus_per_node
                node[2] -= req.gpus_per_node
                node[3] -= req.node_fraction
            chosen.append(row.id)
    return chosen


def test_fitting_is_first_fit_whatever_it_skips() -> None:
    """``fitting`` looks only at nodes with room and skips tasks at least as big as one
    that did not fit (it runs inside the lease's transaction): it picks what a plain
    first fit of every task on every node picks."""
    for seed in range(300):
        rng = random.Random(seed)
        free = [
            NodeResources(
                f"n{rng.randint(0, 5)}", rng.choice([0, 0, 1, 4, 8]),
                tuple(range(rng.randint(0, 2))), rng.choice([0.0, 0.25, 0.5, 1.0, 1.0]),
            )
            for _ in range(rng.randint(1, 10))
        ]
        rows = [
            Row(i, rng.choice([1, 1, 1, 2]), rng.randint(1, 4), rng.choice([1, 2]),
                rng.choice([0, 0, 1]), rng.choice([1, 2, 4]), 0.0, 0.0)
            for i in range(rng.randint(0, 30))
        ]
        got = [row.id for row, _ in fitting(rows, free)]
        assert got == first_fit(rows, free), f"seed {seed}"


def test_lease_is_exactly_once(site: Site, source: DatabaseTaskSource) -> None:
    ids = add_runnable(site, 30)
    l1, l2 = source.register(info()), source.register(info())
    got: dict[int, list[int]] = {l1: [], l2: []}
    while True:
        a = ids_of(source.lease(l1, ROOM, 4))
        b = ids_of(source.lease(l2, ROOM, 4))
        got[l1] += a
        got[l2] += b
        if not a and not b:
            break
    assert not set(got[l1]) & set(got[l2])
    assert sorted(got[l1] + got[l2]) == ids
    # Each lease takes the lowest free ids: the two launchers alternate in blocks of 4.
    assert got[l1] == [t for k, t in enumerate(ids) if (k // 4) % 2 == 0]

    (x,) = add_runnable(site, 1)
    assert ids_of(source.lease(l1, ROOM, 5)) == [x]
    assert source.lease(l2, ROOM, 5) == []
    assert source.lease(l1, ROOM, 5) == []  # not leased twice to its holder either
    set_lease_expires(site, [x], time.time() - 1)
    assert ids_of(source.lease(l2, ROOM, 5)) == [x]
    assert lease_of(site, x)[0] == l2
    # The former holder lost it: its reports are refused.
    assert source.report(l1, [StateUpdate(x, S.RUNNING)]) == [x]
    assert site.task(x).state == "PREPROCESSED"


# --------------------------------------------------------------------------- report


def test_a_lease_takes_the_oldest_tasks_of_every_leasable_state(
    site: Site, source: DatabaseTaskSource
) -> None:
    """One query per state (each reading its rows in id order), merged: the lease gets
    the lowest ids whatever their states, never more than it asked for."""
    lid = source.register(info())
    ids = site.add_tasks([{"command": f"./run {i}"} for i in range(12)])
    runnable(site, ids[0:12:3])  # PREPROCESSED
    site.transition([Change(i, S.STAGED_IN) for i in ids[1:12:3]])  # STAGED_IN
    restart = ids[2:12:6]  # RESTART_READY, by way of a run
    runnable(site, restart)
    site.transition(
        [Change(i, s) for i in restart for s in (S.RUNNING, S.RUN_ERROR, S.RESTART_READY)]
    )
    assert sorted(site.count()) == ["PREPROCESSED", "READY", "RESTART_READY", "STAGED_IN"]
    assert ids_of(source.lease(lid, ROOM, 5)) == ids[:5]
    assert ids_of(source.lease(lid, ROOM, 100)) == ids[5:]


def test_report(site: Site, source: DatabaseTaskSource) -> None:
    holder, stranger = source.register(info()), source.register(info())
    t1, t2, t3, spare = add_runnable(site, 4)
    assert ids_of(source.lease(holder, ROOM, 3)) == [t1, t2, t3]
    assert source.report(holder, []) == []

    n_events = len(site.history(t1))
    assert source.report(stranger, [StateUpdate(t1, S.RUNNING)]) == [t1]
    assert site.task(t1).state == "PREPROCESSED" and len(site.history(t1)) == n_events
    # Not leased at all: refused too.
    assert source.report(holder, [StateUpdate(spare, S.RUNNING)]) == [spare]
    assert site.task(spare).state == "PREPROCESSED"

    assert source.report(holder, [StateUpdate(t, S.RUNNING, "started") for t in (t1, t2, t3)]) == []
    assert {site.task(t).state for t in (t1, t2, t3)} == {"RUNNING"}
    assert lease_of(site, t1)[0] == holder  # still held while running
    last = site.history(t1)[-1]
    assert (last.to_state, last.message, last.launcher_id) == ("RUNNING", "started", holder)

    site.kill(t3, reason="user said stop")
    refused = source.report(
        holder,
        [
            StateUpdate(t1, S.RUN_DONE, "exit 0", return_code=0),
            StateUpdate(t2, S.RUN_ERROR, "exit 3", return_code=3),
            StateUpdate(t3, S.RUN_DONE, "exit 0", return_code=0),
        ],
    )
    assert refused == [t3]
    one, two, three = (site.task(t) for t in (t1, t2, t3))
    assert (one.state, one.return_code) == ("JOB_FINISHED", 0)  # nothing to do after the run
    assert [(e.to_state, e.message, e.launcher_id) for e in site.history(t1)[-3:]] == [
        ("RUN_DONE", "exit 0", holder),
        ("POSTPROCESSED", "no postprocess step", holder),
        ("JOB_FINISHED", "nothing to stage out", holder),
    ]
    assert (two.state, two.return_code) == ("RUN_ERROR", 3)
    assert (three.state, three.return_code) == ("USER_KILLED", None)
    assert site.history(t3)[-1].message == "user said stop"
    assert site.history(t2)[-1].launcher_id == holder
    # The lease ends when the task leaves RUNNING; later reports are not the launcher's.
    assert lease_of(site, t1) == (None, None) and lease_of(site, t2) == (None, None)
    assert source.report(holder, [StateUpdate(t1, S.POSTPROCESSED)]) == [t1]
    assert site.task(t1).state == "JOB_FINISHED"


def test_tasks_with_nothing_to_do_skip_the_processing_worker(
    site: Site, source: DatabaseTaskSource
) -> None:
    """READY tasks with nothing to prepare are leased and fast-forwarded in the lease's
    transaction; a run of one with nothing to do after it finishes in the report's."""
    lid = source.register(info())
    site.add_app("pre", ["sim"], preprocess=["prep"])
    site.add_app("post", ["sim"], postprocess=["tidy"])
    plain = site.add_task(command="./plain").id
    to_stage = site.add_task(command="./x", input_files=["*.dat"]).id
    to_prepare = site.add_task(app="pre").id
    to_tidy = site.add_task(app="post").id
    child = site.add_task(command="./child", parents=[plain]).id

    leased = source.lease(lid, ROOM, 10)
    assert ids_of(leased) == [plain, to_tidy]
    assert {t.state for t in leased} == {S.PREPROCESSED}
    assert [(e.from_state, e.to_state, e.message, e.launcher_id)
            for e in site.history(plain)[-2:]] == [
        ("READY", "STAGED_IN", "nothing to stage in", lid),
        ("STAGED_IN", "PREPROCESSED", "no preprocess step", lid),
    ]
    assert site.task(to_stage).state == site.task(to_prepare).state == "READY"
    assert lease_of(site, to_stage) == lease_of(site, to_prepare) == (None, None)

    for state in (S.RUNNING, S.RUN_DONE):
        assert source.report(lid, [StateUpdate(t, state) for t in (plain, to_tidy)]) == []
    assert site.task(plain).state == "JOB_FINISHED"
    assert site.task(to_tidy).state == "RUN_DONE"  # its postprocess step is the worker's
    assert site.task(child).state == "READY"  # the DAG rules ran in the same transaction
    assert lease_of(site, plain) == lease_of(site, to_tidy) == (None, None)


def test_report_records_batch_job(
    site: Site, source: DatabaseTaskSource, request: pytest.FixtureRequest
) -> None:
    """DESIGN §4: a task records its batch job, and a TaskEvent its launcher and batch job."""
    with site.db.session(write=True) as s:
        job = BatchJob(queue="debug", num_nodes=1, wall_time_min=10, state="RUNNING")
        s.add(job)
        s.flush()
        job_id = job.id
    lid = source.register(info(batch_job_id=job_id))
    (t,) = add_runnable(site, 1)
    source.lease(lid, ROOM, 1)
    assert source.report(lid, [StateUpdate(t, S.RUNNING)]) == []
    event = site.history(t)[-1]
    assert (event.to_state, event.launcher_id) == ("RUNNING", lid)
    assert event.batch_job_id == job_id
    assert site.task(t).batch_job_id == job_id


# --------------------------------------------------------------- heartbeat / release / expiry


def leases(site: Site) -> list[tuple[int, int | None, float | None]]:
    with site.db.session() as s:
        return list(s.execute(
            select(Task.id, Task.lease_launcher_id, Task.lease_expires).order_by(Task.id)
        ))


def set_heartbeat(site: Site, launcher_id: int, when: float) -> None:
    with site.db.session(write=True) as s:
        s.execute(update(Launcher).where(Launcher.id == launcher_id).values(heartbeat=when))


def launcher_row(site: Site, launcher_id: int) -> tuple[float, float | None]:
    with site.db.session() as s:
        row = s.get(Launcher, launcher_id)
        return row.heartbeat, row.stopped


def test_a_heartbeat_writes_one_row_and_returns_the_kills(
    site: Site, source: DatabaseTaskSource
) -> None:
    """A heartbeat renews every lease of its launcher by writing the launcher's row only
    (its cost does not grow with the tasks it holds), and returns its killed tasks."""
    l1, l2 = source.register(info()), source.register(info())
    t1, t2, t3 = add_runnable(site, 3)
    source.lease(l1, ROOM, 2)
    assert ids_of(source.lease(l2, ROOM, 5)) == [t3]
    for launcher_id in (l1, l2):
        set_heartbeat(site, launcher_id, 0.0)
    before = leases(site)

    assert source.heartbeat(l1) == set()
    assert leases(site) == before == [(t1, l1, None), (t2, l1, None), (t3, l2, None)]
    assert launcher_row(site, l1)[0] > 0 and launcher_row(site, l2)[0] == 0.0

    source.report(l1, [StateUpdate(t1, S.RUNNING), StateUpdate(t2, S.RUNNING)])
    site.kill(t2)
    assert source.heartbeat(l1) == {t2}
    assert source.heartbeat(l2) == set()


def test_heartbeat_and_expiry_read_small_indexes_only(tmp_path: Path) -> None:
    """On SQLite (no statistics) the kills and expired leases are read through their
    partial indexes, named in the statements: left to itself, SQLite took
    ``ix_task_lease`` in about half the processes, reading every held task (~20 ms per
    heartbeat at 64,000)."""
    site = Site.init(tmp_path / "site")
    with site.db.session() as s:
        raw = RawSql(s)
        plans = {
            sql: " ".join(row[-1] for row in raw.execute("EXPLAIN QUERY PLAN " + sql, params))
            for sql, params in [
                (database_source._KILLED, [1]),
                (database_source._EXPIRED, [0.0]),
                (database_source._LOST, [0.0]),
            ]
        }
    assert list(plans.values()) == [
        "SEARCH task USING INDEX ix_task_killed (lease_launcher_id=?)",
        "SEARCH task USING INDEX ix_task_lease_expires (lease_expires<?)",
        "SEARCH launcher USING INDEX ix_launcher_live (heartbeat<?)",
    ]
    site.db.dispose()


def test_release_gives_back_all_but_running_tasks(
    site: Site, source: DatabaseTaskSource
) -> None:
    """A released launcher is stopped; its unstarted tasks go to the next launcher at
    once, and a task it still has RUNNING (its end never reported) keeps its lease for
    ``lease_s`` before a lease expiry reclaims it."""
    l1, l2 = source.register(info()), source.register(info())
    running, done, unstarted = add_runnable(site, 3)
    source.lease(l1, ROOM, 3)
    source.report(l1, [
        StateUpdate(running, S.RUNNING), StateUpdate(done, S.RUNNING),
        StateUpdate(done, S.RUN_TIMEOUT, "allocation ends"),
    ])
    released = time.time()
    source.release(l1)
    assert launcher_row(site, l1)[1] >= released and launcher_row(site, l2)[1] is None
    assert lease_of(site, done) == lease_of(site, unstarted) == (None, None)
    holder, expires = lease_of(site, running)
    assert holder == l1 and released + source.lease_s <= expires <= time.time() + source.lease_s
    assert ids_of(source.lease(l2, ROOM, 5)) == [unstarted]

    assert source.expire_leases(time.time()) == 0
    set_heartbeat(site, l2, expires)  # l2 heartbeats meanwhile
    assert source.expire_leases(expires + 1) == 1
    assert site.task(running).state == "RUN_TIMEOUT"
    assert site.history(running)[-1].message == f"launcher {l1} lost: lease expired"
    assert lease_of(site, running) == (None, None)


def test_a_lost_launchers_tasks_are_reclaimed(site: Site, source: DatabaseTaskSource) -> None:
    """A launcher with no heartbeat for ``lease_s`` is lost: a lease expiry moves its
    RUNNING tasks to RUN_TIMEOUT, frees the others, and marks it stopped at its last
    heartbeat.  A live launcher keeps its leases however long ago it took them."""
    lost_one, live = source.register(info()), source.register(info())
    t_run, t_wait, t_live = add_runnable(site, 3)
    source.lease(lost_one, ROOM, 2)
    source.lease(live, ROOM, 1)
    source.report(lost_one, [StateUpdate(t_run, S.RUNNING)])
    last_beat = time.time() - source.lease_s - 5
    set_heartbeat(site, lost_one, last_beat)
    assert source.expire_leases(last_beat + source.lease_s - 1) == 0  # not yet lost

    assert source.expire_leases(last_beat + source.lease_s + 5) == 2
    assert site.task(t_run).state == "RUN_TIMEOUT"
    last = site.history(t_run)[-1]
    assert (last.from_state, last.to_state) == ("RUNNING", "RUN_TIMEOUT")
    assert last.message == f"launcher {lost_one} lost: lease expired (no heartbeat for 65 s)"
    assert site.task(t_wait).state == "PREPROCESSED"
    assert leases(site) == [(t_run, None, None), (t_wait, None, None), (t_live, live, None)]
    assert launcher_row(site, lost_one) == (last_beat, last_beat)
    assert source.expire_leases(time.time()) == 0
    # Its late report is refused; the freed task goes to a live launcher.
    assert source.report(lost_one, [StateUpdate(t_run, S.RUN_DONE, return_code=0)]) == [t_run]
    assert ids_of(source.lease(live, ROOM, 5)) == [t_wait]

    # Found alive again (its heartbeat came through after all), it is live again: what
    # it leases next is reclaimed if it is lost again.
    source.heartbeat(lost_one)
    assert launcher_row(site, lost_one)[1] is None
    (t_next,) = add_runnable(site, 1)
    assert ids_of(source.lease(lost_one, ROOM, 5)) == [t_next]
    assert source.expire_leases(time.time()) == 0
    set_heartbeat(site, lost_one, last_beat)
    assert source.expire_leases(time.time()) == 1
    assert lease_of(site, t_next) == (None, None)


def test_a_reclaim_takes_a_batch_per_call(
    site: Site, source: DatabaseTaskSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lost launcher may have held tens of thousands of tasks, and the caller is a
    launcher's loop: each call reclaims at most RECLAIM_BATCH, expired leases of their
    own first, and marks a lost launcher stopped only once none of its tasks is left."""
    monkeypatch.setattr(database_source, "RECLAIM_BATCH", 2)
    lost_one, live = source.register(info()), source.register(info())
    (own,) = add_runnable(site, 1)
    source.lease(live, ROOM, 1)
    held = add_runnable(site, 5)
    source.lease(lost_one, ROOM, 5)
    set_lease_expires(site, [own], time.time() - 1)
    source.report(lost_one, [StateUpdate(t, S.RUNNING) for t in held[:3]])
    set_heartbeat(site, lost_one, time.time() - source.lease_s - 1)

    counts = []
    while count := source.expire_leases(time.time()):
        counts.append(count)
        assert launcher_row(site, lost_one)[1] is None  # some of its tasks may be left
    assert counts == [2, 2, 2]
    assert launcher_row(site, lost_one)[1] is not None
    assert leases(site) == [(t, None, None) for t in [own, *held]]
    assert site.count() == {"PREPROCESSED": 3, "RUN_TIMEOUT": 3}


def test_an_expired_lease_of_its_own_is_reclaimed(
    site: Site, source: DatabaseTaskSource
) -> None:
    """A lease with a time of its own (a processing worker's claim, a RUNNING task left
    at a release) is reclaimed when that time runs out, even if its launcher is live."""
    lid, other = source.register(info()), source.register(info())
    lost, alive, unstarted = add_runnable(site, 3)
    source.lease(lid, ROOM, 3)
    source.report(lid, [StateUpdate(lost, S.RUNNING), StateUpdate(alive, S.RUNNING)])
    set_lease_expires(site, [lost, unstarted], time.time() - 10)

    assert source.expire_leases(time.time()) == 2
    assert site.task(lost).state == "RUN_TIMEOUT"
    last = site.history(lost)[-1]
    assert (last.from_state, last.to_state) == ("RUNNING", "RUN_TIMEOUT")
    assert last.message == f"launcher {lid} lost: lease expired"
    assert lease_of(site, lost) == (None, None)
    assert site.task(alive).state == "RUNNING" and lease_of(site, alive) == (lid, None)
    assert site.task(unstarted).state == "PREPROCESSED"
    assert lease_of(site, unstarted) == (None, None)
    assert ids_of(source.lease(other, ROOM, 5)) == [unstarted]
    assert source.expire_leases(time.time()) == 0
    # The launcher that lost the task cannot report on it any more.
    assert source.report(lid, [StateUpdate(lost, S.RUN_DONE, return_code=0)]) == [lost]
    assert site.task(lost).state == "RUN_TIMEOUT"


def test_a_running_launcher_reclaims_a_dead_launchers_tasks(
    site: Site, source: DatabaseTaskSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A launcher that died (no release, no report) left RUNNING tasks: once its
    heartbeat is ``lease_s`` old, any launcher's loop moves them to RUN_TIMEOUT with the
    reason, a batch per turn, and the recovery chain takes them from there (here:
    retry-timeout)."""
    from balsam_core.launcher.nodes import local_nodes
    from balsam_core.launcher.pilot import Launcher as Pilot, LauncherOptions
    from balsam_core.processing import TransitionProcessor

    monkeypatch.setattr(database_source, "RECLAIM_BATCH", 1)
    dead = source.register(info())
    task, *others = add_runnable(site, 3, node_packing_count=4)
    source.lease(dead, ROOM, 5)
    source.report(dead, [StateUpdate(t, S.RUNNING, "started on n1") for t in (task, *others)])
    set_heartbeat(site, dead, time.time() - source.lease_s - 1)

    pilot = Pilot(
        site, LauncherOptions(nodes=local_nodes(1, 2, 0), idle_timeout_s=0.2),
        processing=False,
    )
    pilot.run()
    assert site.count() == {"RUN_TIMEOUT": 3}
    last = site.history(task)[-1]
    assert last.from_state == "RUNNING"
    assert last.message.startswith(f"launcher {dead} lost: lease expired (no heartbeat for ")
    assert lease_of(site, task) == (None, None)
    # The dead launcher's late report is refused.
    assert source.report(dead, [StateUpdate(task, S.RUN_DONE, return_code=0)]) == [task]

    processor = TransitionProcessor(site, None, owner_id=pilot.launcher_id)
    try:
        processor.process_once(wait=True)
    finally:
        processor.close()
    assert site.count() == {"RESTART_READY": 3}


def test_a_retried_report_is_not_applied_twice(site: Site, source: DatabaseTaskSource) -> None:
    """A batch whose commit succeeded but whose answer was lost is sent again: the
    repeated RUNNING is recognised (not refused, which would end the task)."""
    lid = source.register(info())
    (task,) = add_runnable(site, 1)
    source.lease(lid, ROOM, 1)
    batch = [StateUpdate(task, S.RUNNING, "started on n1")]
    assert source.report(lid, batch) == []
    assert source.report(lid, batch) == []
    assert [e.to_state for e in site.history(task)].count("RUNNING") == 1


# --------------------------------------------------------------------------- concurrency


def test_concurrent_leases_are_exactly_once(site: Site) -> None:
    n_tasks, n_threads, batch = 1000, 4, 25
    ids = add_runnable(site, n_tasks)
    sources = [DatabaseTaskSource(Site.open(site.site_dir)) for _ in range(n_threads)]
    launchers = [src.register(info()) for src in sources]
    got: list[list[int]] = [[] for _ in range(n_threads)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_threads)

    def work(k: int) -> None:
        try:
            barrier.wait()
            while True:
                leased = sources[k].lease(launchers[k], ROOM, batch)
                if not leased:
                    return
                assert len(leased) <= batch
                got[k] += ids_of(leased)
                # A launcher starts what it leased before its next lease.  Without this
                # pause one thread can win SQLite's write lock every time while the
                # others sleep in the busy handler, and the sharing check below fails.
                time.sleep(0.002)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    for src in sources:
        src.site.db.dispose()
    assert not errors, errors
    everything = [t for part in got for t in part]
    assert len(everything) == len(set(everything)) == n_tasks
    assert sorted(everything) == ids
    with site.db.session() as s:
        holders = dict(s.execute(select(Task.id, Task.lease_launcher_id)).all())
    for k, part in enumerate(got):
        assert all(holders[t] == launchers[k] for t in part)
    assert sum(1 for part in got if part) >= 2  # the threads really did share the work
    with site.db.session() as s:
        assert s.scalar(select(TaskEvent.id).where(TaskEvent.to_state == "RUNNING")) is None
