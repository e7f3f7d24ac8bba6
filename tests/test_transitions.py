"""The task state machine (states.py) and its database layer (transitions.py, Site.transition).

DESIGN §5: every transition is checked against the table in ``states.py`` and recorded
as a TaskEvent in the same transaction; children become READY when every parent
finished; a failed or killed parent fails (or kills) its dependants; a kill always
wins and is never overwritten.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest
from sqlalchemy import event, func, select, update

from balsam_core import hookimpl, transitions
from balsam_core.api import Site
from balsam_core.errors import NotFound
from balsam_core.models import Task, TaskEvent
from balsam_core.plugins import Provider
from balsam_core.states import (
    END,
    TRANSITIONS,
    InvalidTransition,
    State,
    check_transition,
    is_allowed,
    parse_state,
)
from balsam_core.transitions import Change

S = State
#: The happy path of a task after READY.
PATH = [S.STAGED_IN, S.PREPROCESSED, S.RUNNING, S.RUN_DONE, S.POSTPROCESSED, S.JOB_FINISHED]


# --------------------------------------------------------------------------- helpers


def add(site: Site, n: int = 1, **spec: object) -> list[int]:
    return site.add_tasks([{"command": f"echo {i}", **spec} for i in range(n)])


def walk(site: Site, ids: Sequence[int], until: State) -> None:
    """Move READY tasks along the happy path up to *until*, in one call."""
    steps = PATH[: PATH.index(until) + 1]
    site.transition([Change(i, st) for st in steps for i in ids])


def state(site: Site, task_id: int) -> State:
    return State(site.task(task_id).state)


def event_count(site: Site) -> int:
    with site.db.session() as s:
        return int(s.scalar(select(func.count()).select_from(TaskEvent)))


def force_state(site: Site, ids: Sequence[int], st: State) -> None:
    """Put tasks into *st* behind the state machine's back (test setup only)."""
    with site.db.session(write=True) as s:
        s.execute(update(Task).where(Task.id.in_(list(ids))).values(state=st.value))


@contextmanager
def statements(site: Site) -> Iterator[list[str]]:
    """Collect every SQL statement sent to the driver (an executemany counts once)."""
    seen: list[str] = []

    def listener(conn, cursor, statement, *args):  # type: ignore[no-untyped-def]
        seen.append(statement)

    event.listen(site.db.engine, "before_cursor_execute", listener)
    try:
        yield seen
    finally:
        event.remove(site.db.engine, "before_cursor_execute", listener)


# --------------------------------------------------------------------------- the table (pure)


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(State, State)))
def test_check_transition_agrees_with_table(src: State, dst: State) -> None:
    allowed = dst in TRANSITIONS[src]
    assert is_allowed(src, dst) is allowed
    if allowed:
        check_transition(src, dst, 7)
    else:
        with pytest.raises(InvalidTransition) as info:
            check_transition(src, dst, 7)
        err = info.value
        assert (err.task_id, err.src, err.dst) == (7, src, dst)
        assert f"task 7: cannot go from {src.value} to {dst.value}" in str(err)
        assert isinstance(err, ValueError)


def test_table_shape() -> None:
    assert set(TRANSITIONS) == set(State)
    assert END == {S.JOB_FINISHED, S.FAILED, S.USER_KILLED}
    # End states have no way out, except FAILED, which a retry sends back.
    assert TRANSITIONS[S.JOB_FINISHED] == frozenset()
    assert TRANSITIONS[S.USER_KILLED] == frozenset()
    assert TRANSITIONS[S.FAILED] == {S.AWAITING_PARENTS, S.READY, S.RESTART_READY}
    # A kill is possible from every state that is not an end state.
    for src in set(State) - END:
        assert S.USER_KILLED in TRANSITIONS[src], src
    # Nothing goes back to CREATED, and no state moves to itself.
    for src, dsts in TRANSITIONS.items():
        assert S.CREATED not in dsts
        assert src not in dsts
    # The happy path is allowed step by step.
    for a, b in zip([S.READY, *PATH], PATH):
        assert is_allowed(a, b)


def test_invalid_transition_message_for_end_state() -> None:
    with pytest.raises(InvalidTransition, match=r"allowed: none \(end state\)"):
        check_transition(S.USER_KILLED, S.READY)


def test_parse_state() -> None:
    assert parse_state(" run_done ") is S.RUN_DONE
    assert parse_state(S.READY) is S.READY
    with pytest.raises(ValueError, match="unknown state 'DONE'.*JOB_FINISHED"):
        parse_state("DONE")


# --------------------------------------------------------------------------- Site.transition


def test_database_layer_applies_exactly_the_table(site: Site) -> None:
    """Every (from, to) pair through Site.transition: allowed pairs move, others raise."""
    sources = [s for s in State if s is not S.USER_KILLED]  # a killed task is skipped: below
    pairs = list(itertools.product(sources, State))
    ids = add(site, len(pairs))
    by_src: dict[State, list[int]] = {}
    for task_id, (src, _) in zip(ids, pairs):
        by_src.setdefault(src, []).append(task_id)
    for src, group in by_src.items():
        force_state(site, group, src)
    allowed = [(i, dst) for i, (src, dst) in zip(ids, pairs) if is_allowed(src, dst)]
    forbidden = [(i, src, dst) for i, (src, dst) in zip(ids, pairs) if not is_allowed(src, dst)]
    before = event_count(site)
    events = site.transition([Change(i, dst) for i, dst in allowed])
    assert {(e.task_id, e.to_state) for e in events} == set(allowed)
    for task_id, src, dst in forbidden:
        with pytest.raises(InvalidTransition):
            site.transition([Change(task_id, dst)])
    assert event_count(site) == before + len(allowed)
    with site.db.session() as s:
        got = dict(s.execute(select(Task.id, Task.state)).all())
    for task_id, dst in allowed:
        assert got[task_id] == dst.value
    for task_id, src, _ in forbidden:
        assert got[task_id] == src.value


def test_failed_transition_writes_nothing(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = add(site, 2)
    before = event_count(site)
    with pytest.raises(InvalidTransition, match=f"task {b}: cannot go from READY to RUN_DONE"):
        site.transition([Change(a, S.STAGED_IN), Change(b, S.RUN_DONE)])
    # A later step of the same batch fails after an earlier one was written: all rolled back.
    with pytest.raises(InvalidTransition):
        site.transition([Change(a, S.STAGED_IN), Change(a, S.RUNNING)])
    with pytest.raises(NotFound, match="no task with id 999999"):
        site.transition([Change(a, S.STAGED_IN), Change(999999, S.STAGED_IN)])
    assert state(site, a) is S.READY and state(site, b) is S.READY
    assert event_count(site) == before

    # A state change and its TaskEvent are one transaction: no event, no change.
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("event insert failed")

    monkeypatch.setattr(transitions, "record_events", broken)
    with pytest.raises(RuntimeError, match="event insert failed"):
        site.transition([Change(a, S.STAGED_IN)])
    monkeypatch.undo()
    assert state(site, a) is S.READY
    assert event_count(site) == before
    site.transition([Change(a, S.STAGED_IN)])
    assert state(site, a) is S.STAGED_IN
    assert event_count(site) == before + 1


def test_bulk_transition_uses_a_handful_of_statements(site: Site) -> None:
    ids = add(site, 2000)
    with statements(site) as stmts:
        events = site.transition([Change(i, S.STAGED_IN, "staged") for i in ids])
    assert len(events) == 2000
    assert len(stmts) < 20, stmts
    assert site.count() == {"STAGED_IN": 2000}
    force_state(site, ids, S.RUNNING)
    # Two different verdicts with return codes, and a cascade check: still a handful.
    half = len(ids) // 2
    changes = [Change(i, S.RUN_DONE, return_code=0) for i in ids[:half]]
    changes += [Change(i, S.RUN_ERROR, "boom", return_code=3) for i in ids[half:]]
    with statements(site) as stmts:
        site.transition(changes)
    assert len(stmts) < 20, stmts
    assert site.count() == {"RUN_DONE": half, "RUN_ERROR": 2000 - half}
    assert site.task(ids[0]).return_code == 0
    assert site.task(ids[-1]).return_code == 3
    with site.db.session() as s:
        assert s.scalar(select(func.count()).select_from(TaskEvent)) == 2000 * 3


def test_several_changes_of_one_task_in_one_call(site: Site) -> None:
    a, b = add(site, 2)
    events = site.transition(
        [Change(a, st, f"step {n}") for n, st in enumerate(PATH)] + [Change(b, S.STAGED_IN)]
    )
    assert [e.to_state for e in events if e.task_id == a] == PATH
    hist = site.history(a)
    names = ["CREATED", "READY", *[p.value for p in PATH]]
    assert [(h.from_state, h.to_state) for h in hist] == list(zip(names, names[1:]))
    assert [h.message for h in hist[1:]] == [f"step {n}" for n in range(6)]
    assert state(site, a) is S.JOB_FINISHED and state(site, b) is S.STAGED_IN
    events = site.transition([Change(b, S.PREPROCESSED)], launcher_id=42)
    assert events[0].launcher_id == 42
    assert site.history(b)[-1].launcher_id == 42


# --------------------------------------------------------------------------- DAG rules


def test_children_ready_only_when_all_parents_finished(site: Site) -> None:
    p1, p2, other = add(site, 3)
    (child,) = add(site, parents=[p1, p2])
    (unrelated_child,) = add(site, parents=[other])
    assert state(site, child) is S.AWAITING_PARENTS
    walk(site, [p1], S.JOB_FINISHED)
    assert state(site, child) is S.AWAITING_PARENTS
    walk(site, [p2], S.POSTPROCESSED)
    assert state(site, child) is S.AWAITING_PARENTS
    events = site.transition([Change(p2, S.JOB_FINISHED)])
    assert (child, S.AWAITING_PARENTS, S.READY) in {
        (e.task_id, e.from_state, e.to_state) for e in events
    }
    assert state(site, child) is S.READY
    assert site.history(child)[-1].message == "all parents finished"
    assert state(site, unrelated_child) is S.AWAITING_PARENTS


def test_failed_or_killed_parent_cascades_and_kill_wins(site: Site) -> None:
    parent, bystander = add(site, 2)
    (child,) = add(site, parents=[parent])
    (grandchild,) = add(site, parents=[child])
    (other_child,) = add(site, parents=[bystander])
    walk(site, [parent], S.STAGED_IN)
    site.transition([Change(parent, S.FAILED, "stage-in failed")])
    assert state(site, child) is S.FAILED
    assert state(site, grandchild) is S.FAILED
    assert site.history(child)[-1].message == f"parent {parent} failed"
    assert site.history(grandchild)[-1].message == f"parent {child} failed"
    assert state(site, other_child) is S.AWAITING_PARENTS
    assert state(site, bystander) is S.READY

    # A killed parent kills its waiting dependants, transitively.
    (parent,) = add(site)
    (child,) = add(site, parents=[parent])
    (grandchild,) = add(site, parents=[child])
    walk(site, [parent], S.RUNNING)
    events = site.transition([Change(parent, S.USER_KILLED, "by hand")])
    assert {e.task_id for e in events} == {parent, child, grandchild}
    assert {state(site, t) for t in (parent, child, grandchild)} == {S.USER_KILLED}
    assert site.history(child)[-1].message == f"parent {parent} was killed"
    assert site.history(grandchild)[-1].message == f"parent {child} was killed"

    (a,) = add(site)  # a kill is never overwritten
    walk(site, [a], S.RUNNING)
    site.kill(a, reason="stop it")
    events = site.transition([Change(a, S.RUN_DONE, "finished", return_code=0)])
    assert events == []
    assert state(site, a) is S.USER_KILLED
    last = site.history(a)[-1]
    assert (last.from_state, last.to_state, last.message) == ("RUNNING", "USER_KILLED", "stop it")
    assert site.task(a).return_code is None
    # Without skip_killed the table itself refuses: USER_KILLED has no way out.
    with site.db.session(write=True) as s, pytest.raises(InvalidTransition):
        transitions.apply(s, [Change(a, S.RUN_DONE)], skip_killed=False)
    assert state(site, a) is S.USER_KILLED


# --------------------------------------------------------------------------- observers


class Recorder:
    def __init__(self, site: Site) -> None:
        self.site = site
        self.calls: list[list] = []
        self.seen_states: list[dict[int, str]] = []

    @hookimpl
    def balsam_task_transitions(self, events):  # type: ignore[no-untyped-def]
        self.calls.append(list(events))
        # Read through a new connection: only committed data is visible there.
        with self.site.db.session() as s:
            ids = [e.task_id for e in events]
            query = select(Task.id, Task.state).where(Task.id.in_(ids))
            self.seen_states.append(dict(s.execute(query).all()))


class Raiser:
    @hookimpl
    def balsam_task_transitions(self, events):  # type: ignore[no-untyped-def]
        raise RuntimeError("observer is broken")


def test_observers(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    a, b = add(site, 2)
    rec = Recorder(site)
    assert site.plugins.register(Raiser(), Provider("raiser", "test", "0"))
    assert site.plugins.register(rec, Provider("obs", "test", "0"))
    events = site.transition(
        [Change(a, S.STAGED_IN, "go"), Change(b, S.STAGED_IN), Change(a, S.PREPROCESSED)]
    )
    # The raising observer neither undid the transition nor kept the other one from hearing.
    assert len(events) == 3
    assert "observer raiser failed" in caplog.text
    assert state(site, a) is S.PREPROCESSED
    assert len(rec.calls) == 1
    got = [(e.task_id, e.from_state, e.to_state) for e in rec.calls[0]]
    assert sorted(got) == sorted(
        [(a, S.READY, S.STAGED_IN), (b, S.READY, S.STAGED_IN), (a, S.STAGED_IN, S.PREPROCESSED)]
    )
    assert rec.calls[0] == events
    # Called after the commit: a new connection already sees the new states.
    assert rec.seen_states[0] == {a: "PREPROCESSED", b: "STAGED_IN"}
    # A failed transaction is not announced.
    with pytest.raises(InvalidTransition):
        site.transition([Change(a, S.JOB_FINISHED)])
    assert len(rec.calls) == 1
    # Changes dropped because the task was killed are not announced either.
    site.kill(b)
    assert [e.to_state for e in rec.calls[-1]] == [S.USER_KILLED]
    assert site.transition([Change(b, S.PREPROCESSED)]) == []
    assert len(rec.calls) == 2
    # New tasks are announced too (CREATED -> READY).
    (c,) = add(site)
    assert [(e.task_id, e.from_state, e.to_state) for e in rec.calls[-1]] == [
        (c, S.CREATED, S.READY)
    ]
