"""The Python API (balsam_core.api): apps, tasks, the DAG, queries, kill/retry/delete,
history, and the calls a running task makes.  Every test runs on SQLite and PostgreSQL."""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from balsam_core import api
from balsam_core.api import Site
from balsam_core.errors import DependencyCycle, NotFound, ValidationError
from balsam_core.models import App, Task, TaskDependency, TaskEvent, TaskTag
from balsam_core.states import InvalidTransition, State
from balsam_core.transitions import Change

S = State
PATH = [S.STAGED_IN, S.PREPROCESSED, S.RUNNING, S.RUN_DONE, S.POSTPROCESSED, S.JOB_FINISHED]


def walk(site: Site, ids: Sequence[int], until: State) -> None:
    """Move tasks (READY or on the happy path) along the happy path up to *until*."""
    changes = []
    for i in ids:
        now = State(site.task(i).state)
        start = 0 if now is S.READY else PATH.index(now) + 1
        changes += [Change(i, st) for st in PATH[start : PATH.index(until) + 1]]
    site.transition(changes)


def state(site: Site, task_id: int) -> str:
    return site.task(task_id).state


def rows(site: Site, model: type) -> int:
    with site.db.session() as s:
        return int(s.scalar(select(func.count()).select_from(model)))


def snapshot(site: Site) -> tuple[int, ...]:
    """Row counts of every task table: unchanged means nothing was written."""
    return tuple(rows(site, m) for m in (Task, TaskEvent, TaskTag, TaskDependency, App))


# --------------------------------------------------------------------------- apps


def test_app_lifecycle(site: Site) -> None:
    app = site.add_app(
        "sim", "python sim.py --temp {temp} --out={out}", environment={"OMP": "4"},
        postprocess="python post.py", description="a simulation",
    )
    assert app.command == ["python", "sim.py", "--temp", "{temp}", "--out={out}"]
    assert app.postprocess == ["python", "post.py"]
    site.add_app("analyze", ["./analyze", "{x}"])
    assert [a.name for a in site.apps()] == ["analyze", "sim"]
    got = site.app("sim")
    assert (got.command, got.environment, got.description) == (
        app.command, {"OMP": "4"}, "a simulation"
    )
    with pytest.raises(ValidationError, match="app 'sim' already exists"):
        site.add_app("sim", "other {temp}")
    for bad in ("echo {0}", "echo {a.b}", "echo {}", "echo {unclosed"):
        with pytest.raises(ValidationError):
            site.add_app("bad", bad)
    with pytest.raises(ValidationError):
        site.add_app("a/b", "echo")
    # What no process could be given: a NUL byte, a variable name with '='.
    with pytest.raises(ValidationError, match="app 'nul': command .* holds a NUL byte"):
        site.add_app("nul", ["echo", "a\0b"])
    with pytest.raises(ValidationError, match="app 'env': environment 'A=B': names hold no '='"):
        site.add_app("env", "echo", environment={"A=B": "1"})
    with pytest.raises(NotFound, match=r"no app named 'nope' \(apps: analyze, sim\)"):
        site.app("nope")
    with pytest.raises(NotFound, match=r"no app named 'nope' \(apps: analyze, sim\)"):
        site.remove_app("nope")

    (tid,) = site.add_tasks([{"app": "sim", "parameters": {"temp": 300, "out": "o.h5"}}])
    with pytest.raises(ValidationError, match="app 'sim' is used by 1 task"):
        site.remove_app("sim")
    assert [a.name for a in site.apps()] == ["analyze", "sim"]
    site.remove_app("analyze")
    assert [a.name for a in site.apps()] == ["sim"]
    # Task parameters are checked against the app's template fields; errors name the app.
    before = snapshot(site)
    with pytest.raises(ValidationError, match=r"^new task: app 'sim' needs parameter\(s\) out"):
        site.add_task(app="sim", parameters={"temp": 1})
    with pytest.raises(
        ValidationError,
        match=r"^new task: app 'sim' has no parameter\(s\) colour \(it takes: out, temp\)",
    ):
        site.add_task(app="sim", parameters={"temp": 1, "out": "x", "colour": "red"})
    with pytest.raises(ValidationError, match=r"^new task: no app named 'simm' \(apps: sim\)"):
        site.add_task(app="simm", parameters={"temp": 1, "out": "x"})
    with pytest.raises(ValidationError, match="either an app or a command"):
        site.add_task(app="sim", command="echo", parameters={"temp": 1, "out": "x"})
    with pytest.raises(ValidationError, match="either an app or a command"):
        site.add_task(name="x")
    with pytest.raises(ValidationError, match="parameters need an app"):
        site.add_task(command="echo", parameters={"a": 1})
    with pytest.raises(ValidationError, match="unknown task field 'nodes'"):
        site.add_task(command="echo", nodes=2)
    for command in (["echo", "a\0b"], "echo a\0b"):
        with pytest.raises(ValidationError, match="new task: command .* holds a NUL byte"):
            site.add_task(command=command)
    with pytest.raises(ValidationError, match="new task: environment 'X': .*values no NUL byte"):
        site.add_task(command="echo", environment={"X": "a\0b"})
    assert snapshot(site) == before
    site.delete(tid)
    site.remove_app("sim")
    assert site.apps() == []


# --------------------------------------------------------------------------- adding tasks


def test_add_task_fields_and_literal_commands(site: Site) -> None:
    site.add_app("sim", "sim --temp {temp}")
    t = site.add_task(app="sim", parameters={"temp": 300}, workflow="wf", tags={"k": "v"})
    assert (t.name, t.workflow, t.parameters, t.command, t.state) == (
        "sim", "wf", {"temp": 300}, None, "READY"
    )
    assert t.app is not None and t.app.name == "sim"
    assert t.tags == {"k": "v"}

    s = site.add_task(command='/usr/bin/python3 run.py --msg "; rm -rf x" $(id) `id` a|b')
    assert s.command == [
        "/usr/bin/python3", "run.py", "--msg", "; rm -rf x", "$(id)", "`id`", "a|b"
    ]
    assert (s.name, s.workflow, s.app_id, s.state) == ("python3", "default", None, "READY")

    argv = ["./prog", "two words", "; rm -rf x", "$(id)", "'quoted'"]
    lst = site.add_task(command=argv, name="mine")
    assert lst.command == argv
    assert lst.name == "mine"

    r = site.add_task(
        command="echo", num_nodes=2, ranks_per_node="4", threads_per_rank=2, gpus_per_rank=0,
        node_packing_count=1, wall_time_min=1.5, environment={"A": 1}, data={"x": [1, 2]},
    )
    assert (r.num_nodes, r.ranks_per_node, r.threads_per_rank, r.gpus_per_rank) == (2, 4, 2, 0)
    assert (r.wall_time_min, r.environment, r.data) == (1.5, {"A": "1"}, {"x": [1, 2]})

    hist = site.history(t.id)
    assert [(h.from_state, h.to_state, h.message) for h in hist] == [
        ("CREATED", "READY", "created")
    ]

    # Bad resources: ValidationError naming the field, and nothing written.
    before = snapshot(site)
    for field, value in [
        ("num_nodes", -1), ("ranks_per_node", 2.5), ("gpus_per_rank", True), ("num_nodes", None),
    ]:
        with pytest.raises(ValidationError, match=field):
            site.add_task(command="echo", **{field: value})
    assert snapshot(site) == before


@pytest.mark.parametrize(
    ("field", "value", "minimum"),
    [
        ("num_nodes", -1, 1),
        ("num_nodes", 0, 1),
        ("ranks_per_node", 1.5, 1),
        ("threads_per_rank", True, 1),
        ("gpus_per_rank", -2, 0),
        ("node_packing_count", "many", 1),
    ],
)
def test_resource_errors(field: str, value: object, minimum: int) -> None:
    """Pure validation (no database): the message names the field and the minimum."""
    from balsam_core.taskspec import normalize_task

    with pytest.raises(ValidationError, match=f"task 3: {field} must be an integer >= {minimum}"):
        normalize_task({"command": "echo", field: value}, "task 3")


def test_add_tasks_bulk(site: Site) -> None:
    site.add_app("sim", "sim --i {i}")
    n = 20_000
    ids = site.add_tasks({"app": "sim", "parameters": {"i": i}} for i in range(n))
    assert len(ids) == n and ids == sorted(ids) and len(set(ids)) == n
    assert site.count() == {"READY": n}
    for k in (0, 12_345, n - 1):
        assert site.task(ids[k]).parameters == {"i": k}
    before = snapshot(site)
    # An error in the last spec (found inside the transaction): nothing is written.
    specs = [{"app": "sim", "parameters": {"i": i}} for i in range(n)]
    specs[-1] = {"app": "nosuch", "parameters": {"i": 1}}
    with pytest.raises(ValidationError, match=f"^new task #{n}: no app named 'nosuch'"):
        site.add_tasks(specs)
    assert snapshot(site) == before
    assert site.add_tasks([]) == []
    specs = [{"command": "echo"}] * 50 + [{"command": "echo", "num_nodes": -1}]
    with pytest.raises(ValidationError, match="^new task #51: num_nodes"):
        site.add_tasks(specs)
    assert snapshot(site) == before


def test_parents(site: Site) -> None:
    done, running, failed, killed = (site.add_task(command="echo").id for _ in range(4))
    walk(site, [done], S.JOB_FINISHED)
    walk(site, [running], S.RUNNING)
    site.transition([Change(failed, S.FAILED, "bad")])
    site.kill(killed)
    before = snapshot(site)
    with pytest.raises(ValidationError, match="^new task #2: parent task 999999 does not exist"):
        site.add_tasks([{"command": "echo"}, {"command": "echo", "parents": [done, 999999]}])
    with pytest.raises(ValidationError, match=f"parent task {failed} is FAILED"):
        site.add_task(command="echo", parents=[done, failed])
    with pytest.raises(ValidationError, match=f"parent task {killed} is USER_KILLED"):
        site.add_task(command="echo", parents=[killed])
    with pytest.raises(ValidationError, match="parents must be task ids"):
        site.add_task(command="echo", parents=["x"])
    assert snapshot(site) == before

    ready = site.add_task(command="echo", parents=[done])
    waiting = site.add_task(command="echo", parents=[done, running])
    assert ready.state == "READY"
    assert waiting.state == "AWAITING_PARENTS"
    assert site.parents(waiting.id) == sorted([done, running])
    assert site.children(done) == sorted([ready.id, waiting.id])
    walk(site, [running], S.JOB_FINISHED)
    assert state(site, waiting.id) == "READY"


def test_add_dependency(site: Site) -> None:
    a, b, c, d, fin = (site.add_task(command="echo").id for _ in range(5))
    walk(site, [fin], S.JOB_FINISHED)
    site.add_dependency(a, b)  # a waits for b
    assert state(site, a) == "AWAITING_PARENTS"
    assert site.history(a)[-1].message == f"now waits for {[b]}"
    site.add_dependency(b, [c])
    assert site.parents(a) == [b] and site.parents(b) == [c]
    deps = rows(site, TaskDependency)
    with pytest.raises(DependencyCycle, match=f"closes a cycle: {c} -> {a} -> {b} -> {c}"):
        site.add_dependency(c, a)
    with pytest.raises(DependencyCycle, match=f"{d} -> {d}"):
        site.add_dependency(d, d)
    with pytest.raises(NotFound):
        site.add_dependency(d, 999999)
    assert rows(site, TaskDependency) == deps
    assert state(site, c) == "READY" and state(site, d) == "READY"
    # A finished parent does not make a READY task wait.
    site.add_dependency(d, fin)
    assert state(site, d) == "READY" and site.parents(d) == [fin]
    # Adding an existing dependency again changes nothing.
    site.add_dependency(a, b)
    assert site.parents(a) == [b]
    walk(site, [d], S.RUNNING)
    with pytest.raises(ValidationError, match=f"task {d} is RUNNING"):
        site.add_dependency(d, c)
    assert site.parents(d) == [fin]
    # The DAG now works: finishing c frees b, finishing b frees a.
    walk(site, [c], S.JOB_FINISHED)
    assert state(site, b) == "READY" and state(site, a) == "AWAITING_PARENTS"
    walk(site, [b], S.JOB_FINISHED)
    assert state(site, a) == "READY"


# --------------------------------------------------------------------------- queries


def test_queries(site: Site) -> None:
    spec = [
        {"command": "echo", "workflow": "w1", "tags": {"x": "1", "y": "a"}},
        {"command": "echo", "workflow": "w1", "tags": {"x": "1", "y": "b"}},
        {"command": "echo", "workflow": "w2", "tags": {"x": "2", "y": "a"}},
        {"command": "echo", "workflow": "w2"},
    ]
    t1, t2, t3, t4 = site.add_tasks(spec)
    walk(site, [t2], S.STAGED_IN)
    (child,) = site.add_tasks([{"command": "echo", "parents": [t1, t3]}])
    ids = lambda tasks: [t.id for t in tasks]  # noqa: E731
    assert ids(site.tasks()) == [t1, t2, t3, t4, child]
    assert ids(site.tasks(state="READY")) == [t1, t3, t4]
    assert ids(site.tasks(state="staged_in")) == [t2]
    assert ids(site.tasks(state=["STAGED_IN", S.AWAITING_PARENTS])) == [t2, child]
    assert ids(site.tasks(workflow="w1")) == [t1, t2]
    assert ids(site.tasks(tags={"x": "1"})) == [t1, t2]
    assert ids(site.tasks(tags={"x": 1, "y": "a"})) == [t1]  # several tags: all must match
    assert ids(site.tasks(tags={"x": "2", "y": "b"})) == []
    assert ids(site.tasks(workflow="w2", tags={"y": "a"})) == [t3]
    assert ids(site.tasks(parent=t3)) == [child]
    assert ids(site.tasks(ids=[t4, t1, 999])) == [t1, t4]
    assert ids(site.tasks(after_id=t2, limit=2)) == [t3, t4]
    assert site.count() == {"READY": 3, "STAGED_IN": 1, "AWAITING_PARENTS": 1}
    assert site.count(workflow="w1") == {"READY": 1, "STAGED_IN": 1}
    assert site.count(state="READY", tags={"y": "a"}) == {"READY": 2}
    with pytest.raises(ValidationError, match="unknown state 'DONE'"):
        site.tasks(state="DONE")
    with pytest.raises(ValidationError, match="unknown state"):
        site.count(state=["READY", "bogus"])
    with pytest.raises(NotFound):
        site.task(999999)

    more = site.add_tasks([{"command": "echo", "workflow": "page"} for _ in range(53)])
    seen: list[int] = []
    after = None
    while True:
        page = site.tasks(workflow="page", after_id=after, limit=10)
        if not page:
            break
        assert len(page) <= 10
        seen += ids(page)
        after = page[-1].id
    assert seen == more


# --------------------------------------------------------------------------- kill / retry / delete


def test_kill(site: Site) -> None:
    def family() -> dict[str, int]:
        p = site.add_task(command="echo").id
        walk(site, [p], S.RUNNING)
        c = site.add_task(command="echo", parents=[p]).id
        g = site.add_task(command="echo", parents=[c]).id
        spawned = site.add_tasks([{"command": "echo"}] * 3, spawned_by=p)
        walk(site, [spawned[1]], S.RUNNING)
        walk(site, [spawned[2]], S.JOB_FINISHED)
        s_ready, s_run, s_done = spawned
        return {"p": p, "c": c, "g": g, "s_ready": s_ready, "s_run": s_run, "s_done": s_done}

    f = family()
    changed = site.kill(f["p"], reason="enough")
    assert changed == sorted([f["p"], f["c"], f["g"]])
    assert {k: state(site, v) for k, v in f.items()} == {
        "p": "USER_KILLED", "c": "USER_KILLED", "g": "USER_KILLED",
        "s_ready": "READY", "s_run": "RUNNING", "s_done": "JOB_FINISHED",
    }
    last = site.history(f["p"])[-1]
    assert (last.from_state, last.to_state, last.message) == ("RUNNING", "USER_KILLED", "enough")
    assert site.history(f["c"])[-1].message == f"parent {f['p']} was killed"
    assert site.kill(f["p"]) == []  # already in an end state

    f = family()
    changed = site.kill(f["p"], recursive=True, reason="all of it")
    assert changed == sorted(v for k, v in f.items() if k != "s_done")
    assert state(site, f["s_done"]) == "JOB_FINISHED"
    for k in ("p", "c", "g", "s_ready", "s_run"):
        assert state(site, f[k]) == "USER_KILLED", k
    assert site.history(f["s_run"])[-1].message == "all of it"
    assert len(site.history(f["s_done"])) == 7  # untouched

    before = snapshot(site)
    with pytest.raises(NotFound, match="no task with id 999999"):
        site.kill([f["s_ready"], 999999])
    assert snapshot(site) == before


def test_retry_and_history(site: Site) -> None:
    failed, errored, timed_out, ready, parent = (site.add_task(command="echo").id for _ in range(5))
    walk(site, [failed], S.STAGED_IN)
    site.transition([Change(failed, S.FAILED, "stage-in failed")])
    walk(site, [errored, timed_out, parent], S.RUNNING)
    site.transition([Change(errored, S.RUN_ERROR), Change(timed_out, S.RUN_TIMEOUT)])
    child = site.add_task(command="echo", parents=[parent]).id
    site.transition([Change(child, S.FAILED, "gave up")])

    only = "only FAILED, RUN_ERROR, RUN_TIMEOUT"
    with pytest.raises(ValidationError, match=f"task {ready} is READY: {only}"):
        site.retry([failed, ready])
    assert state(site, failed) == "FAILED"  # nothing changed

    assert site.retry([failed, errored, timed_out, child]) == [failed, errored, timed_out, child]
    assert state(site, failed) == "READY"
    assert state(site, errored) == "RESTART_READY"
    assert state(site, timed_out) == "RESTART_READY"
    assert state(site, child) == "AWAITING_PARENTS"  # its parent is still running
    assert site.history(failed)[-1].message == "retry requested"
    walk(site, [parent], S.JOB_FINISHED)
    assert state(site, child) == "READY"
    with pytest.raises(NotFound):
        site.retry(999999)

    # History: every change in order, with from/to/message and the launcher.
    t = site.add_task(command="echo").id
    site.transition([Change(t, S.STAGED_IN, "staged"), Change(t, S.PREPROCESSED, "pre")])
    site.transition([Change(t, S.RUNNING, "started")], launcher_id=5)
    site.transition([Change(t, S.RUN_ERROR, "exit 3", return_code=3)])
    site.retry(t)
    hist = site.history(t)
    assert [(h.from_state, h.to_state, h.message) for h in hist] == [
        ("CREATED", "READY", "created"),
        ("READY", "STAGED_IN", "staged"),
        ("STAGED_IN", "PREPROCESSED", "pre"),
        ("PREPROCESSED", "RUNNING", "started"),
        ("RUNNING", "RUN_ERROR", "exit 3"),
        ("RUN_ERROR", "RESTART_READY", "retry requested"),
    ]
    assert [h.launcher_id for h in hist] == [None, None, None, 5, None, None]
    assert [h.time for h in hist] == sorted(h.time for h in hist)
    with pytest.raises(NotFound):
        site.history(999999)


def test_delete(site: Site) -> None:
    parent = site.add_task(command="echo", tags={"a": "1"}).id
    child = site.add_task(command="echo", parents=[parent], tags={"b": "2"}).id
    (spawned,) = site.add_tasks([{"command": "echo"}], spawned_by=parent)
    other = site.add_task(command="echo", tags={"a": "1"}).id
    walk(site, [other], S.RUNNING)
    before = snapshot(site)

    waits = f"task {parent} has dependant task {child} still to run"
    with pytest.raises(ValidationError, match=waits):
        site.delete(parent)
    with pytest.raises(ValidationError, match=f"task {other} is RUNNING"):
        site.delete([other])
    with pytest.raises(NotFound):
        site.delete([parent, 999999])
    assert snapshot(site) == before

    assert site.delete([parent, child]) == 2
    assert site.tasks(ids=[parent, child]) == []
    with site.db.session() as s:
        for model, col in ((TaskEvent, TaskEvent.task_id), (TaskTag, TaskTag.task_id)):
            query = select(func.count()).select_from(model).where(col.in_([parent, child]))
            assert s.scalar(query) == 0
        assert s.scalar(select(func.count()).select_from(TaskDependency)) == 0
    assert site.task(spawned).spawned_by is None
    assert site.tasks(tags={"a": "1"})[0].id == other

    assert site.delete(other, force=True) == 1
    with pytest.raises(NotFound):
        site.task(other)
    # With force, a parent goes even though a dependant still waits for it.
    p2 = site.add_task(command="echo").id
    c2 = site.add_task(command="echo", parents=[p2]).id
    assert site.delete(p2, force=True) == 1
    assert site.parents(c2) == []


# --------------------------------------------------------------------------- inside a task


@pytest.fixture
def in_task(site: Site, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """The environment of a task the launcher started; yields the task's id."""
    me = site.add_task(command="./run", workflow="wfx").id
    walk(site, [me], S.RUNNING)
    api._current = None
    monkeypatch.setenv("BALSAM_SITE", str(site.site_dir))
    monkeypatch.setenv("BALSAM_TASK_ID", str(me))
    yield me
    if api._current is not None:
        api._current.db.dispose()
    api._current = None


def test_inside_a_task(site: Site, in_task: int, monkeypatch: pytest.MonkeyPatch) -> None:
    me = in_task
    assert api.current_task().id == me
    assert api.current_site().site_dir == site.site_dir

    added = api.add_task(command="./next step")
    assert (added.workflow, added.spawned_by, added.command) == ("wfx", None, ["./next", "step"])
    elsewhere = api.add_task(command="./x", workflow="other")
    assert elsewhere.workflow == "other"

    child = api.spawn_child(command=["./analyze", "out.h5"], tags={"kind": "analysis"})
    assert (child.spawned_by, child.state, child.workflow) == (me, "READY", "wfx")
    assert child.tags == {"kind": "analysis"}
    with pytest.raises(ValidationError, match=f"^child of task {me}: num_nodes"):
        api.spawn_child(command="./x", num_nodes=0)

    victim = site.add_task(command="./victim").id
    assert api.kill(victim) == [victim]
    msg = site.history(victim)[-1].message
    assert f"killed by task {me}" in msg and socket.gethostname() in msg
    # A recursive kill of the spawner reaches the spawned child.
    site.kill(me, recursive=True)
    assert state(site, child.id) == "USER_KILLED"

    monkeypatch.delenv("BALSAM_TASK_ID")
    with pytest.raises(ValidationError, match="BALSAM_TASK_ID is not set"):
        api.current_task()
    with pytest.raises(ValidationError, match="BALSAM_TASK_ID is not set"):
        api.spawn_child(command="./x")
    monkeypatch.setenv("BALSAM_TASK_ID", "abc")
    with pytest.raises(ValidationError):
        api.current_task_id()


# --------------------------------------------------------------------------- fixed bugs


def test_add_dependency_with_a_repeated_parent(site: Site) -> None:
    a, b = (site.add_task(command="echo").id for _ in range(2))
    site.add_dependency(a, [b, b])  # like add_task(parents=[b, b]), which is accepted
    assert site.parents(a) == [b]
    assert state(site, a) == "AWAITING_PARENTS"


def test_retry_with_a_repeated_id(sqlite_site: Site) -> None:
    site = sqlite_site
    t = site.add_task(command="echo").id
    site.transition([Change(t, S.FAILED, "bad")])
    site.retry([t, t])
    assert state(site, t) == "READY"


def test_task_ids_are_never_reused(
    site: Site, backend: str, request: pytest.FixtureRequest
) -> None:
    """A deleted task's id (and so its default workdir ``<workflow>/<name>_<id>``) must not
    be handed to a new task; PostgreSQL's sequence guarantees it."""
    a, b, c = site.add_tasks([{"command": "./sim"}] * 3)
    site.delete(c)
    new = site.add_task(command="./sim")
    assert new.id > c
    assert new.default_workdir != f"default/sim_{c}"


def test_forced_delete_of_a_parent_frees_its_children(site: Site) -> None:
    done = site.add_task(command="echo").id
    walk(site, [done], S.JOB_FINISHED)
    p = site.add_task(command="echo").id
    c = site.add_task(command="echo", parents=[done, p]).id
    assert state(site, c) == "AWAITING_PARENTS"
    site.delete(p, force=True)
    assert site.parents(c) == [done]
    assert state(site, c) == "READY"  # every remaining parent has finished (DESIGN §5)


def test_current_site_is_opened_once(sqlite_site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    api._current = None
    monkeypatch.setenv("BALSAM_SITE", str(sqlite_site.site_dir) + "/")
    try:
        first = api.current_site()
        assert first.site_dir == sqlite_site.site_dir
        assert api.current_site() is first
    finally:
        if api._current is not None:
            api._current.db.dispose()
        api._current = None


def test_spawned_task_history_names_the_spawner(sqlite_site: Site) -> None:
    me = sqlite_site.add_task(command="./parent").id
    (child,) = sqlite_site.add_tasks([{"command": "./child"}], spawned_by=me)
    assert sqlite_site.task(child).spawned_by == me
    assert f"spawned by task {me}" in sqlite_site.history(child)[0].message
