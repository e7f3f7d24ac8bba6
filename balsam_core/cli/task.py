"""``balsam task add|ls|show|history|kill|retry|rm|dep|wait``."""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

import click

from ..errors import ValidationError
from ..models import Task, workdir_of
from ..states import END, State
from .common import Context, echo_json, fmt_time, pass_ctx, parse_pairs, shorten, table

STATE_NAMES = [s.value for s in State]


@click.group("task")
def task_group() -> None:
    """Add, inspect and control tasks."""


def _command_text(task: Task) -> str:
    if task.app is not None:
        params = " ".join(f"{k}={v}" for k, v in task.parameters.items())
        return f"{task.app.name} {params}".strip()
    return shlex.join(task.command or [])


def task_dict(task: Task) -> dict[str, Any]:
    """A task as plain data (for --json)."""
    return {
        "id": task.id, "name": task.name, "workflow": task.workflow, "state": task.state,
        "app": task.app.name if task.app else None, "parameters": task.parameters,
        "command": task.command, "workdir": workdir_of(task),
        "num_nodes": task.num_nodes, "ranks_per_node": task.ranks_per_node,
        "threads_per_rank": task.threads_per_rank, "gpus_per_rank": task.gpus_per_rank,
        "node_packing_count": task.node_packing_count, "wall_time_min": task.wall_time_min,
        "mpi_flags": task.mpi_flags, "environment": task.environment, "tags": task.tags, "data": task.data,
        "input_files": task.input_files, "post_error_handler": task.post_error_handler,
        "post_timeout_handler": task.post_timeout_handler,
        "auto_timeout_retry": task.auto_timeout_retry, "num_retries": task.num_retries,
        "max_retries": task.max_retries, "return_code": task.return_code,
        "spawned_by": task.spawned_by, "created": task.created, "state_time": task.state_time,
    }


# ---------------------------------------------------------------------- add


@task_group.command("add")
@click.argument("app", required=False)
@click.option("-p", "--param", "params", multiple=True, metavar="K=V", help="App parameter.")
@click.option("-c", "--command", help="A literal command instead of an app (no shell runs it).")
@click.option("--name", help="Task name (default: the app or program name).")
@click.option("-w", "--workflow", default="default", show_default=True)
@click.option("-n", "--num-nodes", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--ranks-per-node", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--threads-per-rank", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--gpus-per-rank", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--node-packing-count", type=click.IntRange(min=1), default=1, show_default=True,
              help="How many such tasks may share a node.")
@click.option("--wall-time-min", type=click.FloatRange(min=0), default=0, help="0: no limit.")
@click.option("--parent", "parents", type=click.IntRange(min=1), multiple=True, help="Task id to wait for.")
@click.option("--env", multiple=True, metavar="K=V", help="Environment variable.")
@click.option("--tag", "tags", multiple=True, metavar="K=V", help="Tag for filtering.")
@click.option("--mpi-flag", "mpi_flags", multiple=True, metavar="FLAG",
              help="Extra flag for the MPI launcher, one per option (e.g. --mpi-flag=-l).")
@click.option("--workdir", help="Working directory inside the site's data/.")
@click.option("--input-file", "input_files", multiple=True, help="Glob of parent outputs to stage in.")
@click.option("--post-error-handler", is_flag=True, help="Run the app's postprocess on error.")
@click.option("--post-timeout-handler", is_flag=True, help="Run the app's postprocess on timeout.")
@click.option("--auto-timeout-retry/--no-auto-timeout-retry", default=True, show_default=True)
@click.option("--max-retries", type=click.IntRange(min=0), help="Overrides [recovery] max_retries.")
@click.option("--jsonl", type=click.File("r"), help="Add many tasks: one JSON object per line.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the new ids.")
@pass_ctx
def add_command(ctx: Context, app: str | None, jsonl: Any, quiet: bool, **opts: Any) -> None:
    """Add a task running APP (with --param) or a literal --command.

    With --jsonl FILE, add one task per line, e.g.
    {"app": "sim", "parameters": {"temp": 300}, "num_nodes": 2, "parents": [4]};
    all are added in one transaction, or none.
    """
    site = ctx.site()
    if jsonl is not None:
        if app or opts["command"]:
            raise click.UsageError("--jsonl cannot be combined with APP or --command")
        numbered = _read_jsonl(jsonl)
        ids = site.add_tasks(
            [spec for _, spec in numbered], labels=[f"{jsonl.name} line {n}" for n, _ in numbered]
        )
        click.echo("\n".join(map(str, ids)) if quiet else f"Added {len(ids)} tasks: {_ranges(ids)}")
        return
    spec: dict[str, Any] = {
        "name": opts["name"], "workflow": opts["workflow"], "workdir": opts["workdir"],
        "num_nodes": opts["num_nodes"], "ranks_per_node": opts["ranks_per_node"],
        "threads_per_rank": opts["threads_per_rank"], "gpus_per_rank": opts["gpus_per_rank"],
        "node_packing_count": opts["node_packing_count"], "wall_time_min": opts["wall_time_min"],
        "parents": list(opts["parents"]), "environment": parse_pairs(opts["env"], "--env"),
        "tags": parse_pairs(opts["tags"], "--tag"), "input_files": list(opts["input_files"]),
        "mpi_flags": list(opts["mpi_flags"]),
        "post_error_handler": opts["post_error_handler"],
        "post_timeout_handler": opts["post_timeout_handler"],
        "auto_timeout_retry": opts["auto_timeout_retry"], "max_retries": opts["max_retries"],
    }
    if app is not None and opts["command"] is not None:
        raise click.UsageError("give an APP or --command, not both")
    if app is not None:
        spec["app"] = app
        spec["parameters"] = parse_pairs(opts["params"], "--param")
    elif opts["command"] is not None:
        if opts["params"]:
            raise click.UsageError("--param needs an APP; a --command takes none")
        spec["command"] = opts["command"]
    else:
        raise click.UsageError("give an APP or --command 'PROGRAM ARGS' (or --jsonl FILE)")
    spec = {k: v for k, v in spec.items() if v is not None}
    (task_id,) = site.add_tasks([spec])
    task = site.task(task_id)
    click.echo(task_id if quiet else f"Added task {task_id} ({task.name}) in {task.state}")


def _read_jsonl(stream: Any) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, spec)`` for every non-blank line."""
    specs = []
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            spec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValidationError(f"{stream.name} line {number}: invalid JSON: {exc.msg}") from None
        if not isinstance(spec, dict):
            raise ValidationError(f"{stream.name} line {number}: expected a JSON object")
        specs.append((number, spec))
    if not specs:
        raise ValidationError(f"{stream.name}: no tasks in file")
    return specs


def _ranges(ids: Sequence[int]) -> str:
    """``[1,2,3,7]`` -> ``"1-3, 7"``."""
    parts, start = [], None
    for i, value in enumerate(ids):
        if start is None:
            start = value
        if i + 1 == len(ids) or ids[i + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ", ".join(parts)


# ---------------------------------------------------------------------- ls / show / history


def _filters(state: Sequence[str], workflow: str | None, tags: Sequence[str]) -> dict[str, Any]:
    return {
        "state": list(state) or None,
        "workflow": workflow,
        "tags": parse_pairs(tags, "--tag") or None,
    }


state_option = click.option(
    "-s", "--state", multiple=True, type=click.Choice(STATE_NAMES, case_sensitive=False),
    help="Only tasks in this state (repeatable).",
)
workflow_option = click.option("-w", "--workflow", help="Only tasks of this workflow.")
tag_option = click.option("-t", "--tag", "tags", multiple=True, metavar="K=V", help="Only tasks with this tag.")


@task_group.command("ls")
@state_option
@workflow_option
@tag_option
@click.option("--parent", type=int, help="Only children of this task.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="Page size.")
@click.option("--after", type=int, default=0, help="Show tasks with ids above this (next page).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--tree", is_flag=True, help="Show the dependency graph of the selected tasks.")
@pass_ctx
def ls_command(
    ctx: Context, state: Sequence[str], workflow: str | None, tags: Sequence[str],
    parent: int | None, limit: int, after: int, as_json: bool, tree: bool,
) -> None:
    """List tasks, oldest first, a page at a time."""
    site = ctx.site()
    filters = {**_filters(state, workflow, tags), "parent": parent}
    tasks = site.tasks(**filters, after_id=after or None, limit=limit)
    if as_json:
        echo_json([task_dict(t) for t in tasks])
        return
    if not tasks:
        click.echo("No tasks match." if after == 0 else "No more tasks.")
        return
    if tree:
        click.echo(_tree(site, tasks))
    else:
        rows = [
            (t.id, t.state, t.workflow, shorten(t.name, 24), t.num_nodes,
             t.ranks_per_node * t.threads_per_rank, shorten(_command_text(t), 40),
             ",".join(f"{k}={v}" for k, v in t.tags.items()))
            for t in tasks
        ]
        click.echo(table(rows, ("ID", "STATE", "WORKFLOW", "NAME", "NODES", "CPUS", "COMMAND", "TAGS")))
    if len(tasks) == limit:
        click.echo(f"-- next page: balsam task ls ... --after {tasks[-1].id}", err=True)


def _tree(site: Any, tasks: Sequence[Task]) -> str:
    """The selected tasks as an indented forest; a task with several parents is
    drawn under the first and referenced under the others."""
    by_id = {t.id: t for t in tasks}
    children: dict[int, list[int]] = {t.id: [] for t in tasks}
    has_parent: set[int] = set()
    for t in tasks:
        for p in site.parents(t.id):
            if p in by_id:
                children[p].append(t.id)
                has_parent.add(t.id)
    lines: list[str] = []
    drawn: set[int] = set()

    def draw(task_id: int, prefix: str, last: bool, root: bool) -> None:
        t = by_id[task_id]
        branch = "" if root else ("└─ " if last else "├─ ")
        if task_id in drawn:
            lines.append(f"{prefix}{branch}{t.id} (see above)")
            return
        drawn.add(task_id)
        lines.append(f"{prefix}{branch}{t.id} {t.name} [{t.state}]")
        below = prefix + ("" if root else ("   " if last else "│  "))
        for i, child in enumerate(children[task_id]):
            draw(child, below, i == len(children[task_id]) - 1, False)

    for t in tasks:
        if t.id not in has_parent:
            draw(t.id, "", True, True)
    return "\n".join(lines)


@task_group.command("show")
@click.argument("task_id", type=int)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def show_command(ctx: Context, task_id: int, as_json: bool) -> None:
    """Show every field of a task, its parents and children."""
    site = ctx.site()
    info = task_dict(site.task(task_id))
    info["parents"] = site.parents(task_id)
    info["children"] = site.children(task_id)
    if as_json:
        echo_json(info)
        return
    for key in ("created", "state_time"):
        info[key] = fmt_time(info[key])
    width = max(map(len, info))
    for key, value in info.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value) if value else "-"
        click.echo(f"{key:<{width}}  {'-' if value is None else value}")


@task_group.command("history")
@click.argument("task_id", type=int)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def history_command(ctx: Context, task_id: int, as_json: bool) -> None:
    """Every state change of a task, with time, launcher and message."""
    events = ctx.site().history(task_id)
    if as_json:
        echo_json(
            [
                {"time": e.time, "from": e.from_state, "to": e.to_state, "message": e.message,
                 "launcher_id": e.launcher_id, "batch_job_id": e.batch_job_id}
                for e in events
            ]
        )
        return
    rows = [
        (fmt_time(e.time), e.from_state or "-", e.to_state, e.launcher_id, e.message)
        for e in events
    ]
    click.echo(table(rows, ("TIME", "FROM", "TO", "LAUNCHER", "MESSAGE")))


# ---------------------------------------------------------------------- control


@task_group.command("kill")
@click.argument("task_ids", type=int, nargs=-1, required=True)
@click.option("-r", "--recursive", is_flag=True, help="Also kill every descendant and spawned task.")
@pass_ctx
def kill_command(ctx: Context, task_ids: Sequence[int], recursive: bool) -> None:
    """Kill tasks (running ones are stopped by their launcher)."""
    killed = ctx.site().kill(list(task_ids), recursive=recursive, reason="killed from the CLI")
    click.echo(f"Killed {len(killed)} task(s): {_ranges(killed)}" if killed else "Nothing to kill")


@task_group.command("retry")
@click.argument("task_ids", type=int, nargs=-1, required=True)
@pass_ctx
def retry_command(ctx: Context, task_ids: Sequence[int]) -> None:
    """Run FAILED, RUN_ERROR or RUN_TIMEOUT tasks again."""
    ids = ctx.site().retry(list(task_ids))
    click.echo(f"Retrying {len(ids)} task(s): {_ranges(ids)}")


@task_group.command("rm")
@click.argument("task_ids", type=int, nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Also delete running tasks and tasks others wait for.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask.")
@pass_ctx
def rm_command(ctx: Context, task_ids: Sequence[int], force: bool, yes: bool) -> None:
    """Delete tasks and their history."""
    if not yes and sys.stdin.isatty():
        click.confirm(f"Delete {len(task_ids)} task(s) and their history?", abort=True)
    count = ctx.site().delete(list(task_ids), force=force)
    click.echo(f"Deleted {count} task(s)")


@task_group.command("dep")
@click.argument("child", type=int)
@click.argument("parents", type=int, nargs=-1, required=True)
@pass_ctx
def dep_command(ctx: Context, child: int, parents: Sequence[int]) -> None:
    """Make CHILD wait for PARENTS to finish."""
    ctx.site().add_dependency(child, list(parents))
    click.echo(f"Task {child} now waits for {', '.join(map(str, parents))}")


@task_group.command("wait")
@click.argument("task_ids", type=int, nargs=-1)
@workflow_option
@tag_option
@click.option("--timeout", type=click.FloatRange(min=0), help="Give up after this many seconds.")
@click.option("--interval", type=click.FloatRange(min=0.05), default=1.0, show_default=True)
@pass_ctx
def wait_command(
    ctx: Context, task_ids: Sequence[int], workflow: str | None, tags: Sequence[str],
    timeout: float | None, interval: float,
) -> None:
    """Show progress until the tasks end.

    Exit 0 when every task finished, 1 when some failed or were killed, 124 on --timeout.
    """
    site = ctx.site()
    filters: dict[str, Any] = _filters((), workflow, tags)
    if task_ids:
        filters["ids"] = list(task_ids)
        for task_id in task_ids:
            site.task(task_id)  # unknown ids fail now, not never
    elif workflow is None and not tags:
        raise click.UsageError("give TASK_IDS, --workflow or --tag")
    tty = sys.stdout.isatty()
    deadline = None if timeout is None else time.monotonic() + timeout
    last = ""
    while True:
        counts = site.count(**filters)
        total = sum(counts.values())
        done = sum(n for s, n in counts.items() if State(s) in END)
        line = f"{done}/{total} done  " + "  ".join(f"{s}:{n}" for s, n in sorted(counts.items()))
        if line != last:
            click.echo(("\r" + line.ljust(len(last))) if tty else line, nl=not tty)
            last = line
        if done == total:
            if tty:
                click.echo()
            unfinished = total - counts.get(State.JOB_FINISHED.value, 0)
            click.get_current_context().exit(1 if unfinished else 0)
        if deadline is not None and time.monotonic() > deadline:
            if tty:
                click.echo()
            click.echo(f"Timed out with {total - done} task(s) not done", err=True)
            click.get_current_context().exit(124)
        time.sleep(interval)
