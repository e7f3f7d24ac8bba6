"""Validation of what users give for apps and tasks, before anything is written.

Every check raises :class:`~balsam_core.errors.ValidationError` with one line naming
where the input came from (``task 3``, ``tasks.jsonl line 17``) and what is allowed.
"""

from __future__ import annotations

import functools
import posixpath
import shlex
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .errors import ValidationError

#: Resource fields: (minimum, default).
RESOURCES: dict[str, tuple[int, int]] = {
    "num_nodes": (1, 1),
    "ranks_per_node": (1, 1),
    "threads_per_rank": (1, 1),
    "gpus_per_rank": (0, 0),
    "node_packing_count": (1, 1),
}
FLAGS: dict[str, bool] = {
    "post_error_handler": False,
    "post_timeout_handler": False,
    "auto_timeout_retry": True,
}
#: Every key a task spec may have.
TASK_KEYS: frozenset[str] = frozenset(
    {
        "name", "workflow", "app", "parameters", "command", "workdir", "wall_time_min",
        "environment", "mpi_flags", "input_files", "stage_in", "stage_out", "max_retries",
        "tags", "data", "parents", *RESOURCES, *FLAGS,
    }
)


def parse_argv(value: str | Sequence[str], where: str, what: str = "command") -> list[str]:
    """An argv list from a list, or from a string split like a shell would (no shell runs)."""
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            raise ValidationError(f"{where}: {what} {value!r}: {exc}") from None
    elif isinstance(value, Sequence) and all(isinstance(a, str) for a in value):
        argv = list(value)
    else:
        raise ValidationError(f"{where}: {what} must be a string or a list of strings")
    if not argv:
        raise ValidationError(f"{where}: {what} is empty")
    if any("\0" in a for a in argv):
        raise ValidationError(f"{where}: {what} {argv!r} holds a NUL byte")
    return argv


def template_fields(argv: Sequence[str]) -> set[str]:
    """The ``{param}`` names used in an argv template."""
    names: set[str] = set()
    for arg in argv:
        try:
            names |= {f for _, f, _, _ in string.Formatter().parse(arg) if f is not None}
        except ValueError as exc:
            raise ValidationError(f"bad template {arg!r}: {exc}") from None
    if "" in names or any(not n.isidentifier() for n in names):
        raise ValidationError(f"command template fields must be names like {{x}}: {list(argv)}")
    return names


def render_argv(argv: Sequence[str], parameters: Mapping[str, Any]) -> list[str]:
    """Fill an app's argv template; each element stays one argument, whatever it holds."""
    return [arg.format_map({k: str(v) for k, v in parameters.items()}) for arg in argv]


def task_environment(
    app_env: Mapping[str, Any] | None, task_env: Mapping[str, Any] | None
) -> dict[str, str]:
    """The variables a task adds to its environment: the app's, then the task's own."""
    env = {str(k): str(v) for k, v in (app_env or {}).items()}
    env.update((str(k), str(v)) for k, v in (task_env or {}).items())
    return env


def check_parameters(app: str, fields: set[str], parameters: Mapping[str, Any], where: str) -> None:
    """Every template field has a value, and no value is for an unknown field."""
    missing = sorted(fields - set(parameters))
    if missing:
        raise ValidationError(f"{where}: app '{app}' needs parameter(s) {', '.join(missing)}")
    unknown = sorted(set(parameters) - fields)
    if unknown:
        allowed = ", ".join(sorted(fields)) or "none"
        raise ValidationError(
            f"{where}: app '{app}' has no parameter(s) {', '.join(unknown)} (it takes: {allowed})"
        )


def check_relative_path(value: Any, where: str, what: str) -> str:
    """A relative path that cannot climb out of the directory it is relative to."""
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(f"{where}: {what} must be a non-empty relative path")
    norm = posixpath.normpath(value)
    if posixpath.isabs(value) or norm == ".." or norm.startswith("../"):
        raise ValidationError(f"{where}: {what} {value!r} must stay inside the site's data/")
    return norm


def _int(value: Any, key: str, minimum: int, where: str) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValidationError(f"{where}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def _str_map(value: Any, key: str, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and k for k in value):
        raise ValidationError(f"{where}: {key} must be a table of name = value")
    return {k: str(v) for k, v in value.items()}


def check_environment(value: Any, key: str, where: str) -> dict[str, str]:
    """Environment variables (a table of name = value) a process can be given."""
    env = _str_map(value, key, where)
    for name, text in env.items():
        if "=" in name or "\0" in name or "\0" in text:
            raise ValidationError(
                f"{where}: {key} {name!r}: names hold no '=' and no NUL byte, values no NUL byte"
            )
    return env


def _str_list(value: Any, key: str, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ValidationError(f"{where}: {key} must be a list of strings")
    return list(value)


def _table(value: Any, key: str, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValidationError(f"{where}: {key} must be a table")
    return dict(value)


def _list(value: Any, key: str, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValidationError(f"{where}: {key} must be a list")
    return value


def _flag(value: Any, key: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def _label(value: Any, key: str, where: str) -> str:
    value = str(value)
    if value in _GOOD_LABELS:
        return value
    if not value or value in (".", "..") or "/" in value or "\0" in value:
        raise ValidationError(f"{where}: {key} {value!r} must be a non-empty name without '/'")
    if len(_GOOD_LABELS) < 10000:
        _GOOD_LABELS.add(value)
    return value


def _wall_time(value: Any, key: str, where: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValidationError(f"{where}: {key} must be a number >= 0, got {value!r}")
    return float(value)


def _parents(value: Any, key: str, where: str) -> list[int]:
    if value is None:
        return []
    items = [value] if isinstance(value, (int, str)) else value
    try:
        parents = [int(p) for p in items if not isinstance(p, bool)]
    except (TypeError, ValueError):
        parents = []
    if len(parents) != len(items) or any(p < 1 for p in parents):
        raise ValidationError(f"{where}: parents must be task ids, got {value!r}")
    return sorted(set(parents))


_GOOD_LABELS: set[str] = {"default"}

#: One checker per optional field: ``(value, key, where) -> column value``.
_CHECKS: dict[str, Callable[[Any, str, str], Any]] = {
    "name": _label,
    "workflow": _label,
    "workdir": lambda v, k, w: None if v is None else check_relative_path(v, w, k),
    "wall_time_min": _wall_time,
    "max_retries": lambda v, k, w: None if v is None else _int(v, k, 0, w),
    "environment": check_environment,
    "tags": _str_map,
    "mpi_flags": _str_list,
    "input_files": _str_list,
    "stage_in": _list,
    "stage_out": _list,
    "data": _table,
    "parameters": _table,
    "parents": _parents,
    **{k: (lambda v, k, w, m=m: _int(v, k, m, w)) for k, (m, _) in RESOURCES.items()},
    **{k: _flag for k in FLAGS},
}

#: Column values of a task that gives nothing but its command.
_DEFAULTS: dict[str, Any] = {
    "name": None,
    "workflow": "default",
    "workdir": None,
    "wall_time_min": 0.0,
    "max_retries": None,
    "environment": {},
    "tags": {},
    "mpi_flags": [],
    "input_files": [],
    "stage_in": [],
    "stage_out": [],
    "data": {},
    "parameters": {},
    "parents": [],
    **{k: default for k, (_, default) in RESOURCES.items()},
    **FLAGS,
}


@functools.lru_cache(maxsize=4096)
def _split(command: str) -> tuple[str, ...]:
    return tuple(shlex.split(command))


def normalize_task(spec: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check a task spec and return its column values (plus ``app`` name and ``parents``).

    ``app`` is kept as a name here; the caller resolves it and checks its parameters.
    Only the keys present are checked, so a bulk add of small specs stays cheap.
    """
    row = dict(_DEFAULTS)
    app = command = None
    for key, value in spec.items():
        if key == "app":
            app = value
        elif key == "command":
            command = value
        else:
            check = _CHECKS.get(key)
            if check is None:
                raise ValidationError(
                    f"{where}: unknown task field '{key}' (allowed: {', '.join(sorted(TASK_KEYS))})"
                )
            row[key] = check(value, key, where)
    if (app is None) == (command is None):
        raise ValidationError(f"{where}: give either an app or a command (not both, not neither)")
    if app is not None:
        if not isinstance(app, str):
            raise ValidationError(f"{where}: app must be a name")
        row["command"] = None
    else:
        if isinstance(command, str):
            try:
                row["command"] = list(_split(command))
            except ValueError as exc:
                raise ValidationError(f"{where}: command {command!r}: {exc}") from None
            if not row["command"]:
                raise ValidationError(f"{where}: command is empty")
            if "\0" in command:
                raise ValidationError(f"{where}: command {command!r} holds a NUL byte")
        else:
            row["command"] = parse_argv(command, where)
        if row["parameters"]:
            raise ValidationError(f"{where}: parameters need an app (a literal command takes none)")
    row["app"] = app
    if row["name"] is None:
        row["name"] = _label(app if app is not None else posixpath.basename(row["command"][0]), "name", where)
    return row
