"""The transition processor (DESIGN §6): bulk fast-forward, stage-in/out, pre/postprocess,
recovery and error handlers, and exactly-once claims — with real files, real
subprocesses and, where the database matters, SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from sqlalchemy import event, select, update

from balsam_core.api import Site
from balsam_core.models import Launcher, Task, TaskEvent
from balsam_core.processing import TransitionProcessor, site_policies
from balsam_core.states import State
from balsam_core.transitions import Change

S = State
PY = sys.executable


def new_owner(site: Site) -> int:
    """A launcher row to lease for (the lease column is a foreign key)."""
    with site.db.session(write=True) as s:
        launcher = Launcher(host="test", pid=os.getpid())
        s.add(launcher)
        s.flush()
        return launcher.id


def processor(site: Site, **kw: object) -> TransitionProcessor:
    return TransitionProcessor(site, None, new_owner(site), **kw)  # type: ignore[arg-type]


def configure(site: Site, *, allowed_roots: Sequence[str] | None = None, **recovery: object) -> None:
    cfg = site.config
    if allowed_roots is not None:
        cfg = dataclasses.replace(cfg, site=dataclasses.replace(cfg.site, allowed_roots=list(allowed_roots)))
    if recovery:
        cfg = dataclasses.replace(cfg, recovery=dataclasses.replace(cfg.recovery, **recovery))
    site.config = cfg


def state(site: Site, task_id: int) -> State:
    return State(site.task(task_id).state)


def last_message(site: Site, task_id: int) -> str:
    return site.history(task_id)[-1].message


def workdir(site: Site, task_id: int) -> Path:
    task = site.task(task_id)
    return site.config.data_dir / (task.workdir or task.default_workdir)


def run(site: Site, ids: Sequence[int], end: State = S.RUN_DONE, rc: int | None = 0) -> None:
    """What a launcher reports: PREPROCESSED -> RUNNING -> *end*."""
    site.transition(
        [Change(i, S.RUNNING) for i in ids] + [Change(i, end, "simulated", rc) for i in ids]
    )


def to_preprocessed(site: Site, ids: Sequence[int]) -> None:
    site.transition(
        [Change(i, S.STAGED_IN) for i in ids] + [Change(i, S.PREPROCESSED) for i in ids]
    )


def lease(site: Site, task_id: int) -> tuple[int | None, float | None]:
    with site.db.session() as s:
        row = s.execute(
            select(Task.lease_launcher_id, Task.lease_expires).where(Task.id == task_id)
        ).one()
    return row[0], row[1]


class Statements:
    """Counts SQL statements sent to the database."""

    def __init__(self, site: Site) -> None:
        self.engine = site.db.engine
        self.count = 0

    def _on(self, *args: object) -> None:
        self.count += 1

    def __enter__(self) -> Statements:
        event.listen(self.engine, "before_cursor_execute", self._on)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._on)


class SqliteSteps:
    """Counts the SQLite virtual-machine instructions of the statements run meanwhile:
    a measure of the rows a query reads that, unlike time, does not depend on the
    machine."""

    def __init__(self, site: Site) -> None:
        self.engine = site.db.engine
        self.count = 0
        self._connections: list[object] = []

    def _tick(self) -> int:
        self.count += 100
        return 0  # go on

    def _on(self, conn: object, *args: object) -> None:
        raw = conn.connection.driver_connection  # type: ignore[attr-defined]
        raw.set_progress_handler(self._tick, 100)
        self._connections.append(raw)

    def __enter__(self) -> SqliteSteps:
        event.listen(self.engine, "before_cursor_execute", self._on)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._on)
        for raw in self._connections:
            raw.set_progress_handler(None, 0)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- bulk paths


def test_fast_forward_in_bulk_takes_a_handful_of_statements(site: Site) -> None:
    ids = site.add_tasks({"command": f"./sim {i}"} for i in range(1000))
    # Whatever the number of tasks: a probe, one read per state and kind of step (10),
    # and the writes.
    with processor(site, batch=1000) as proc:
        with Statements(site) as sql:
            assert proc.process_once() == 1000
        assert sql.count <= 16, sql.count
        assert site.count() == {"PREPROCESSED": 1000}
        assert [e.message for e in site.history(ids[0])][1:] == [
            "nothing to stage in", "no preprocess step"
        ]
        assert lease(site, ids[-1]) == (None, None)

        run(site, ids)
        with Statements(site) as sql:
            assert proc.process_once() == 1000
        assert sql.count <= 16, sql.count
        assert site.count() == {"JOB_FINISHED": 1000}
        assert proc.process_once() == 0
        # Idle passes only look (no write transaction).
        with Statements(site) as sql:
            assert proc.process_once() == 0
        assert sql.count <= 2, sql.count


@pytest.mark.parametrize("workflow", [None, "w"])
def test_a_launchers_processor_does_not_read_the_backlog(
    sqlite_site: Site, workflow: str | None
) -> None:
    """Inside a launcher, READY tasks with nothing to do are the task source's (it
    fast-forwards them as it leases them): the processor's passes must find the few
    tasks with work without reading the others, however many there are."""
    site = sqlite_site
    site.add_app("pre", ["./sim", "{x}"], preprocess=[PY, "-c", "pass"])

    def pass_cost(backlog: int) -> int:
        site.add_tasks([{"command": "./sim", "workflow": "w"}] * backlog)
        with processor(site, workflow=workflow, forward_ready=False) as proc:
            proc.process_once(wait=True)
            assert proc.process_once() == 0  # idle: a probe
            with SqliteSteps(site) as idle:
                assert proc.process_once() == 0
            staged, preprocessed = site.add_tasks([
                {"command": "./sim", "workflow": "w", "input_files": ["*.dat"]},
                {"app": "pre", "parameters": {"x": 1}, "workflow": "w"},
            ])
            with SqliteSteps(site) as busy:
                proc.process_once(wait=True)
            assert state(site, staged) is S.PREPROCESSED  # staged in, nothing to preprocess
            assert state(site, preprocessed) is S.PREPROCESSED
        return idle.count + busy.count

    small = pass_cost(100)
    large = pass_cost(5000)  # 5100 READY tasks now
    assert large < small * 1.5, (small, large)
    assert site.count()["READY"] == 5100


def test_three_level_dag_completes(site: Site) -> None:
    site.add_app("noop", [PY, "-c", "pass"])
    a = site.add_tasks([{"app": "noop", "name": f"a{i}"} for i in range(3)])
    b = site.add_tasks([{"app": "noop", "name": f"b{i}", "parents": a} for i in range(2)])
    (c,) = site.add_tasks([{"app": "noop", "name": "c", "parents": b}])
    assert state(site, c) is S.AWAITING_PARENTS
    with processor(site) as proc:
        for _ in range(20):
            proc.process_once()
            ready = [t.id for t in site.tasks(state=S.PREPROCESSED)]
            if not ready and state(site, c) is S.JOB_FINISHED:
                break
            run(site, ready)
        assert site.count() == {"JOB_FINISHED": 6}
    finished = {t: site.history(t)[-1].time for t in (*a, *b, c)}
    ready_c = [e for e in site.history(c) if e.to_state == "READY"]
    assert ready_c[0].message == "all parents finished"
    assert ready_c[0].time >= max(finished[t] for t in b)


# --------------------------------------------------------------------------- files


def test_input_files_copy_parent_outputs(sqlite_site: Site) -> None:
    site = sqlite_site
    p1, p2 = site.add_tasks([{"command": "./gen", "name": "p1"}, {"command": "./gen", "name": "p2"}])
    (child,) = site.add_tasks(
        [{"command": "./reduce", "parents": [p1, p2], "input_files": ["*.out", "notes/*.txt"]}]
    )
    with processor(site) as proc:
        proc.process_once()
        for parent, files in (
            (p1, {"a.out": "a", "result.out": "one", "notes/n.txt": "note"}),
            (p2, {"result.out": "two", "other.dat": "x"}),
        ):
            for name, text in files.items():
                path = workdir(site, parent) / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
        run(site, [p1, p2])
        proc.process_once()
        assert state(site, child) is S.READY
        proc.process_once(wait=True)
    assert state(site, child) is S.PREPROCESSED
    staged = [e.message for e in site.history(child) if e.to_state == "STAGED_IN"]
    assert staged == ["staged in 4 file(s)"]
    got = {p.name: p.read_text() for p in workdir(site, child).iterdir()}
    assert got == {"a.out": "a", "result.out": "one", f"result.out_{p2}": "two", "n.txt": "note"}
    # Copies, not links: the parent's output is untouched by writes in the child.
    (workdir(site, child) / "a.out").write_text("changed")
    assert (workdir(site, p1) / "a.out").read_text() == "a"


def test_stage_in_only_from_allowed_roots(sqlite_site: Site, tmp_path: Path) -> None:
    site = sqlite_site
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "mesh.dat").write_text("mesh")
    (shared / "sneaky").symlink_to("/etc/passwd")
    (site.config.data_dir / "common").mkdir()
    (site.config.data_dir / "common" / "table.csv").write_text("1,2")
    (site.config.data_dir / "blocked").write_text("a file where a workdir should be")
    configure(site, allowed_roots=[str(shared)])
    specs = {
        "url": [f"file://{shared}/mesh.dat"],
        "into_dir": [{"src": str(shared / "mesh.dat"), "dst": "inputs/"}, "common/table.csv"],
        "renamed": [{"src": f"file://localhost{shared}/mesh.dat", "dst": "m.dat"}],
        "etc": ["/etc/passwd"],
        "dotdot": ["../../../../../../etc/passwd"],
        "symlink": [f"file://{shared}/sneaky"],
        "config": ["../balsam.toml"],
        "escape_dst": [{"src": str(shared / "mesh.dat"), "dst": "../../escape"}],
        "http": ["http://example.com/mesh.dat"],
        "missing": [str(shared / "nope.dat")],
        "bad_entry": [{"from": "x"}],
    }
    ids = dict(
        zip(specs, site.add_tasks({"command": "./sim", "name": k, "stage_in": v} for k, v in specs.items()))
    )
    (blocked,) = site.add_tasks([{"command": "./sim", "workdir": "blocked", "stage_in": ["common/table.csv"]}])
    with processor(site) as proc:
        proc.process_once(wait=True)

    for ok in ("url", "into_dir", "renamed"):
        assert state(site, ids[ok]) is S.PREPROCESSED, (ok, last_message(site, ids[ok]))
    assert (workdir(site, ids["url"]) / "mesh.dat").read_text() == "mesh"
    assert (workdir(site, ids["into_dir"]) / "inputs" / "mesh.dat").read_text() == "mesh"
    assert (workdir(site, ids["into_dir"]) / "table.csv").read_text() == "1,2"
    assert (workdir(site, ids["renamed"]) / "m.dat").read_text() == "mesh"

    expected = {
        "etc": "stage_in: '/etc/passwd' is outside the site's data directory and [site] allowed_roots",
        "dotdot": "is outside the site's data directory",
        "symlink": "resolves to /etc/passwd, outside",
        "config": "'../balsam.toml' is outside",
        "escape_dst": "'../../escape' must be relative and stay inside the working directory",
        "http": "unsupported URL scheme 'http'",
        "missing": "nope.dat' does not exist",
        "bad_entry": "must be {src, dst}",
    }
    for name, text in expected.items():
        assert state(site, ids[name]) is S.FAILED, name
        assert text in last_message(site, ids[name]), (name, last_message(site, ids[name]))
    assert str(shared) in last_message(site, ids["etc"])  # names the allowed roots
    assert not (site.site_dir.parent / "escape").exists()
    assert state(site, blocked) is S.FAILED
    assert last_message(site, blocked).startswith("setup failed: FileExistsError")
    assert "\n" not in last_message(site, blocked)


def test_pre_and_postprocess_and_stage_out(sqlite_site: Site, tmp_path: Path) -> None:
    site = sqlite_site
    results = tmp_path / "results"
    configure(site, allowed_roots=[str(results)])
    show_env = (
        "import os, pathlib; e = os.environ; pathlib.Path('env.txt').write_text("
        "' '.join(e.get(k, '-') for k in "
        "('BALSAM_TASK_ID', 'BALSAM_SITE', 'APP_VAR', 'TASK_VAR', 'BALSAM_TASK_ERROR')));"
        "pathlib.Path('group.info').write_text(f'{os.getpgid(0) == os.getpid()} {os.getsid(0)}')"
    )
    site.add_app(
        "good", [PY, "-c", "pass"], environment={"APP_VAR": "app", "TASK_VAR": "app"},
        preprocess=[PY, "-c", show_env + "; print('prep ok')"],
        postprocess=[PY, "-c", "open('summary.txt', 'w').write('done'); open('x.h5', 'w')"],
    )
    site.add_app(
        "bad", [PY, "-c", "pass"],
        preprocess=[PY, "-c", "import sys\nfor i in range(30): print('line', i)\n"
                    "print('bad input: missing mesh', file=sys.stderr); sys.exit(3)"],
    )
    site.add_app("slow", [PY, "-c", "pass"], preprocess=[PY, "-c", "import time; time.sleep(30)"])
    site.add_app("ghost", [PY, "-c", "pass"], preprocess=["/no/such/program"])
    good, out_bad, bad, slow, ghost = site.add_tasks(
        [
            {"app": "good", "environment": {"TASK_VAR": "task"},
             "stage_out": [{"src": "*.txt", "dst": f"{results}/"},
                           {"src": "x.h5", "dst": f"file://{results}/renamed.h5"}]},
            {"app": "good", "stage_out": [{"src": "summary.txt", "dst": "/etc/summary.txt"}]},
            {"app": "bad"},
            {"app": "slow"},
            {"app": "ghost"},
        ]
    )
    t0 = time.time()
    with processor(site, step_timeout_s=1.0) as proc:
        proc.process_once(wait=True)
        assert time.time() - t0 < 10
        assert state(site, good) is S.PREPROCESSED, last_message(site, good)
        env = (workdir(site, good) / "env.txt").read_text().split()
        assert env == [str(good), str(site.site_dir), "app", "task", "-"]
        leads_group, session = (workdir(site, good) / "group.info").read_text().split()
        assert leads_group == "True"  # killed as a group
        if sys.version_info >= (3, 11):  # 3.10's Popen can only make it a session leader
            assert int(session) == os.getsid(0)  # where batch systems tracking sessions see it
        assert "prep ok" in (workdir(site, good) / "preprocess.log").read_text()

        message = last_message(site, bad)
        assert state(site, bad) is S.FAILED
        assert message.startswith("preprocess exited with code 3; last lines of preprocess.log:")
        assert message.splitlines()[-1] == "bad input: missing mesh"
        assert "line 29" in message and "line 5" not in message
        assert "line 0" in (workdir(site, bad) / "preprocess.log").read_text()
        assert [e.to_state for e in site.history(bad)][-2:] == ["STAGED_IN", "FAILED"]

        assert state(site, slow) is S.FAILED
        assert last_message(site, slow).startswith("preprocess timed out after 1 s (killed)")
        assert last_message(site, ghost) == "preprocess: executable not found: /no/such/program"

        run(site, [good, out_bad])
        proc.process_once(wait=True)
    assert state(site, good) is S.JOB_FINISHED, last_message(site, good)
    assert [e.message for e in site.history(good)][-2:] == ["postprocess done", "staged out 3 file(s)"]
    assert (results / "summary.txt").read_text() == "done"
    assert (results / "env.txt").exists()  # *.txt
    assert (results / "renamed.h5").exists()
    assert state(site, out_bad) is S.FAILED
    assert "'/etc/summary.txt' is outside" in last_message(site, out_bad)


# --------------------------------------------------------------------------- recovery


def test_recovery_retry_restart_and_fail(site: Site) -> None:
    configure(site, transient_exit_codes=[75], backoff_s=30.0, max_retries=3)
    specs = {
        "transient": {},
        "timeout": {},
        "crash": {},
        "capped": {"max_retries": 0},
        "no_auto": {"auto_timeout_retry": False},
        "raised": {"max_retries": 5},
    }
    ids = dict(zip(specs, site.add_tasks({"command": "./sim", "name": k, **v} for k, v in specs.items())))
    to_preprocessed(site, list(ids.values()))
    run(site, [ids["transient"], ids["capped"]], S.RUN_ERROR, 75)
    run(site, [ids["crash"]], S.RUN_ERROR, 1)
    run(site, [ids["timeout"], ids["no_auto"], ids["raised"]], S.RUN_TIMEOUT, None)
    with site.db.session(write=True) as s:
        s.execute(update(Task).where(Task.id == ids["raised"]).values(num_retries=3))
    stderr = workdir(site, ids["crash"])
    stderr.mkdir(parents=True)
    (stderr / "stderr").write_text("x" * 5000 + "\nTraceback...\nValueError: bad mesh\n")
    failed_at = site.task(ids["transient"]).state_time
    (explicit,) = site.add_tasks([{"command": "./sim", "workflow": "x", "max_retries": 1}])
    to_preprocessed(site, [explicit])
    run(site, [explicit], S.RUN_ERROR, 75)
    with site.db.session(write=True) as s:
        s.execute(update(Task).where(Task.id == explicit).values(num_retries=1))

    # Policies built for [recovery] max_retries = 3: the task's own limit (1) still holds.
    with TransitionProcessor(site, site_policies(site), new_owner(site), workflow="x") as proc:
        assert proc.process_once() == 1
    assert state(site, explicit) is S.FAILED
    assert last_message(site, explicit) == f"task {explicit} failed: exit code 75 (after 1 retries)"

    with processor(site) as proc:
        assert proc.process_once() == 5
        assert state(site, ids["timeout"]) is S.RESTART_READY
        assert site.task(ids["timeout"]).num_retries == 1
        assert last_message(site, ids["timeout"]) == "timed out; retry 1 of 3"
        assert state(site, ids["raised"]) is S.RESTART_READY  # its own max_retries = 5
        assert site.task(ids["raised"]).num_retries == 4
        assert state(site, ids["crash"]) is S.FAILED
        message = last_message(site, ids["crash"])
        assert message.startswith(f"task {ids['crash']} failed: exit code 1")
        assert message.endswith("ValueError: bad mesh")
        assert state(site, ids["capped"]) is S.FAILED  # its own max_retries = 0
        assert last_message(site, ids["capped"]) == f"task {ids['capped']} failed: exit code 75"
        assert state(site, ids["no_auto"]) is S.FAILED
        assert lease(site, ids["timeout"]) == (None, None)

        # The transient error waits out its backoff, unleased, due 30 s after it failed.
        assert state(site, ids["transient"]) is S.RUN_ERROR
        assert lease(site, ids["transient"]) == (None, pytest.approx(failed_at + 30))
        assert proc.process_once(now=failed_at + 10) == 0
        assert state(site, ids["transient"]) is S.RUN_ERROR
        assert proc.process_once(now=failed_at + 31) == 1
    assert state(site, ids["transient"]) is S.RESTART_READY
    assert site.task(ids["transient"]).num_retries == 1
    assert last_message(site, ids["transient"]) == "exit code 75 is transient; retry 1 of 3 in 30 s"
    assert lease(site, ids["transient"]) == (None, None)


HANDLER = """
import os, sys
print("handler: error", os.environ.get("BALSAM_TASK_ERROR"), "timeout", os.environ.get("BALSAM_TASK_TIMEOUT"))
if os.environ.get("BALSAM_TASK_TIMEOUT") == "1":
    sys.exit(0)
if not os.path.exists("repairable"):
    sys.exit(4)
from balsam_core import api
api.current_site().set_state(api.current_task_id(), "JOB_FINISHED", "repaired by handler")
"""


def test_error_and_timeout_handlers(site: Site) -> None:
    site.add_app("h", [PY, "-c", "pass"], postprocess=[PY, "-c", HANDLER])
    repaired, unhandled, timed_out = site.add_tasks(
        [
            {"app": "h", "post_error_handler": True},
            {"app": "h", "post_error_handler": True},
            {"app": "h", "post_timeout_handler": True},
        ]
    )
    to_preprocessed(site, [repaired, unhandled, timed_out])
    run(site, [repaired, unhandled], S.RUN_ERROR, 1)
    run(site, [timed_out], S.RUN_TIMEOUT, None)
    workdir(site, repaired).mkdir(parents=True)
    (workdir(site, repaired) / "repairable").touch()
    with processor(site) as proc:
        assert proc.process_once(wait=True) == 3
    # The handler set the state itself, through the API.
    assert state(site, repaired) is S.JOB_FINISHED
    assert last_message(site, repaired) == "repaired by handler"
    assert "handler: error 1 timeout None" in (workdir(site, repaired) / "postprocess.log").read_text()
    assert lease(site, repaired) == (None, None)
    # Handlers that set nothing: FAILED, with the exit code (and the log when it is not 0).
    assert state(site, unhandled) is S.FAILED
    message = last_message(site, unhandled)
    assert message.startswith("error handler did not set a state (exit code 4); last lines of")
    assert message.endswith("handler: error 1 timeout None")
    assert state(site, timed_out) is S.FAILED
    assert last_message(site, timed_out) == "timeout handler did not set a state (exit code 0)"
    assert "handler: error None timeout 1" in (workdir(site, timed_out) / "postprocess.log").read_text()
    assert lease(site, timed_out) == (None, None)


# --------------------------------------------------------------------------- claims


def test_leases_and_filters_decide_what_is_claimed(sqlite_site: Site) -> None:
    site = sqlite_site
    mine, theirs, expired, other_wf, tagged = site.add_tasks(
        [
            {"command": "./a", "workflow": "w"},
            {"command": "./a", "workflow": "w"},
            {"command": "./a", "workflow": "w"},
            {"command": "./a", "workflow": "v"},
            {"command": "./a", "workflow": "w", "tags": {"k": "x"}},
        ]
    )
    other = new_owner(site)
    now = time.time()
    with site.db.session(write=True) as s:
        s.execute(update(Task).where(Task.id == theirs).values(lease_launcher_id=other, lease_expires=now + 60))
        s.execute(update(Task).where(Task.id == expired).values(lease_launcher_id=other, lease_expires=now - 1))
    with processor(site, workflow="w") as proc:
        assert proc.process_once(now=now) == 3
        assert {t.id for t in site.tasks(state=S.PREPROCESSED)} == {mine, expired, tagged}
        assert lease(site, expired) == (None, None)
        assert proc.process_once(now=now + 61) == 1  # their lease ran out
    with processor(site, tags={"k": "x"}) as proc:
        assert proc.process_once(now=now) == 0
    assert state(site, other_wf) is S.READY


def test_two_processors_never_claim_the_same_task(site: Site) -> None:
    (site.config.data_dir / "in.txt").write_text("input")
    specs = [{"command": "./sim", "stage_in": ["in.txt"]} for _ in range(200)]
    specs += [{"command": "./sim"} for _ in range(20)]
    ids = site.add_tasks(specs)
    one = processor(site, batch=25, workers=4, max_inflight=20)
    two = processor(site, batch=25, workers=4, max_inflight=20)
    with one, two:
        # Interleaved calls: each sees the other's in-flight leases.
        for _ in range(500):
            one.process_once()
            two.process_once()
            if not one.inflight and not two.inflight and not site.count(state=S.READY):
                break
        # And truly concurrent passes from two threads on a second batch.
        more = site.add_tasks(specs[100:])
        errors: list[BaseException] = []

        def loop(proc: TransitionProcessor) -> None:
            try:
                for _ in range(2000):
                    proc.process_once()
                    if not proc.inflight and not site.count(state=S.READY):
                        return
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=loop, args=(p,)) for p in (one, two)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
    all_ids = [*ids, *more]
    assert site.count() == {"PREPROCESSED": len(all_ids)}
    with site.db.session() as s:
        rows = s.execute(
            select(TaskEvent.task_id, TaskEvent.launcher_id).where(TaskEvent.to_state == "STAGED_IN")
        ).all()
    per_task: dict[int, list[int | None]] = {}
    for task_id, who in rows:
        per_task.setdefault(task_id, []).append(who)
    assert sorted(per_task) == sorted(all_ids)
    assert all(len(v) == 1 for v in per_task.values())
    # Alternating calls share the work; free-running threads may not (timing decides).
    assert {per_task[i][0] for i in ids[:200]} == {one.owner_id, two.owner_id}
