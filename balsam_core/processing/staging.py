"""Stage-in and stage-out: input_files from the parents, stage_in and stage_out copies,
and the path checks against the site's ``data/`` and ``[site] allowed_roots``.

* **Copy, never link.**  input_files, stage_in and stage_out copy (``shutil.copy2``;
  directories with ``copytree(symlinks=True)``, which copies links as links and never
  follows them).  A hard link would let a child overwrite its parent's output in place;
  a symlink breaks when the source is cleaned up and hides what a task actually read.
* **input_files** are globs relative to each parent's working directory; matches go to
  the child's working directory under their base name.  When several parents provide
  the same name, the lowest parent id keeps it and the others get ``<name>_<parent id>``
  (as Balsam always did).  A pattern that matches nothing is not an error.
* **stage_in** entries are a path, a ``file://`` URL, or ``{"src": ..., "dst": ...}``
  (``dst`` relative to the working directory; a trailing ``/`` or an existing directory
  means "into it"; default: the source's base name).  Relative sources are relative to
  the site's ``data/``.  **stage_out** entries are ``{"src": glob relative to the working
  directory, "dst": path or file:// URL}``; ``dst`` is a directory when it ends in ``/``,
  already is one, or ``src`` is a glob; a ``src`` that matches nothing fails the task.
* **Allowed roots.**  Every file read or written outside the task's working directory
  must lie, both as written (``..`` collapsed) and with every symlink resolved, inside the
  site's ``data/`` or one of ``[site] allowed_roots`` (relative roots are relative to
  the site directory).  The rest of the site directory — ``balsam.toml``, the database —
  is not readable this way.  Anything else fails the task with a message naming the
  path and the allowed roots.  (Checks happen just before each copy; this guards
  against mistakes and hostile task specs, not against a concurrent attacker swapping
  symlinks.)
"""

from __future__ import annotations

import os
import posixpath
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from .items import _Item, _StepFailed


class _Staging:
    """File work of :class:`~balsam_core.processing.TransitionProcessor` (a mixin)."""

    data_dir: Path
    roots: tuple[Path, ...]

    def _workdir(self, item: _Item) -> Path:
        workdir = self.data_dir / item.workdir
        workdir.mkdir(parents=True, exist_ok=True)
        real = workdir.resolve()
        if not self._inside(real):
            raise _StepFailed(
                f"working directory {workdir} resolves to {real}, outside {self._roots_text()}"
            )
        return real

    def _inside(self, path: Path) -> bool:
        return inside(path, self.roots)

    def _roots_text(self) -> str:
        return "the site's data directory and [site] allowed_roots (" + ", ".join(
            str(r) for r in self.roots
        ) + ")"

    def _local(self, value: Any, what: str) -> Path:
        """An absolute path from a path or ``file://`` URL (relative: to the site's data/)."""
        if not isinstance(value, str) or not value.strip():
            raise _StepFailed(f"{what}: expected a path or file:// URL, got {value!r}")
        text = value
        if "://" in value or value.startswith("file:"):
            url = urlparse(value)
            if url.scheme != "file":
                raise _StepFailed(
                    f"{what}: unsupported URL scheme '{url.scheme}' in {value!r} "
                    "(only local paths and file:// URLs)"
                )
            if url.netloc not in ("", "localhost"):
                raise _StepFailed(
                    f"{what}: {value!r} names host '{url.netloc}'; only local files are supported"
                )
            text = unquote(url.path)
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = self.data_dir / path
        return Path(os.path.normpath(path))

    def _checked(self, path: Path, value: Any, what: str, *, must_exist: bool) -> Path:
        """*path* with symlinks resolved, refusing anything outside the allowed roots."""
        if not self._inside(path):
            raise _StepFailed(f"{what}: {value!r} is outside {self._roots_text()}")
        if must_exist and not path.exists():
            raise _StepFailed(f"{what}: {value!r} does not exist")
        real = path.resolve()
        if not self._inside(real):
            raise _StepFailed(
                f"{what}: {value!r} resolves to {real}, outside {self._roots_text()}"
            )
        return real

    @staticmethod
    def _relative(value: Any, what: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise _StepFailed(f"{what}: expected a relative path, got {value!r}")
        norm = posixpath.normpath(value)
        if posixpath.isabs(value) or norm == ".." or norm.startswith("../"):
            raise _StepFailed(
                f"{what}: {value!r} must be relative and stay inside the working directory"
            )
        return norm

    def _in_workdir(self, workdir: Path, rel: str, name: str, what: str) -> Path:
        """Where a file named *name* goes for destination *rel* (``""``: the workdir)."""
        target = workdir / rel if rel else workdir
        if not rel or rel.endswith("/") or target.is_dir():
            target = target / name
        target.parent.mkdir(parents=True, exist_ok=True)
        parent = target.parent.resolve()
        if parent != workdir and not parent.is_relative_to(workdir):
            raise _StepFailed(f"{what}: destination {rel!r} leaves the working directory")
        return parent / target.name

    def _stage_in(self, item: _Item, workdir: Path, parents: list[tuple[int, str]]) -> int:
        count = 0
        if item.input_files:
            patterns = [self._relative(p, "input_files") for p in item.input_files]
            taken: set[str] = set()
            for parent_id, parent_rel in parents:
                parent_dir = self.data_dir / parent_rel
                if not parent_dir.is_dir():
                    continue
                seen: set[Path] = set()
                for pattern in patterns:
                    for match in sorted(parent_dir.glob(pattern)):
                        if match in seen:
                            continue
                        seen.add(match)
                        where = f"input_files: {pattern!r} of parent {parent_id}"
                        real = self._checked(Path(os.path.normpath(match)), str(match), where,
                                             must_exist=True)
                        name = match.name
                        if name in taken:
                            name = f"{name}_{parent_id}"
                        taken.add(name)
                        _copy(real, self._in_workdir(workdir, "", name, "input_files"))
                        count += 1
        for entry in item.stage_in:
            if isinstance(entry, Mapping):
                if "src" not in entry or set(entry) - {"src", "dst"}:
                    raise _StepFailed(f"stage_in: entry {entry!r} must be {{src, dst}}")
                src, dst = entry["src"], entry.get("dst") or ""
            else:
                src, dst = entry, ""
            path = self._local(src, "stage_in")
            real = self._checked(path, src, "stage_in", must_exist=True)
            rel = ""
            if dst:
                rel = self._relative(dst, "stage_in dst")
                if str(dst).endswith("/"):
                    rel += "/"
            _copy(real, self._in_workdir(workdir, rel, path.name, "stage_in"))
            count += 1
        return count

    def _stage_out(self, item: _Item, workdir: Path) -> int:
        count = 0
        for entry in item.stage_out:
            if not isinstance(entry, Mapping) or set(entry) != {"src", "dst"}:
                raise _StepFailed(
                    f"stage_out: entry {entry!r} must be {{src: glob in the working directory, "
                    "dst: path}}"
                )
            pattern = self._relative(entry["src"], "stage_out src")
            matches = sorted(workdir.glob(pattern))
            if not matches:
                raise _StepFailed(
                    f"stage_out: nothing matches {entry['src']!r} in the working directory"
                )
            dst_value = entry["dst"]
            dst = self._local(dst_value, "stage_out dst")
            as_dir = (
                str(dst_value).endswith("/") or dst.is_dir() or len(matches) > 1
                or any(c in entry["src"] for c in "*?[")
            )
            dst_real = self._checked(dst, dst_value, "stage_out dst", must_exist=False)
            for match in matches:
                src = self._checked(Path(os.path.normpath(match)), str(match), "stage_out src",
                                    must_exist=True)
                target = dst_real / match.name if as_dir else dst_real
                target.parent.mkdir(parents=True, exist_ok=True)
                target = self._checked(target.parent.resolve() / target.name, dst_value,
                                       "stage_out dst", must_exist=False)
                _copy(src, target)
                count += 1
        return count


def allowed_roots(site_dir: Path, data_dir: Path, roots: Sequence[str]) -> tuple[Path, ...]:
    """Where task files may lie: the data directory and ``[site] allowed_roots``, resolved."""
    result = [data_dir]
    for root in roots:
        path = Path(root).expanduser()
        if not path.is_absolute():
            path = site_dir / path
        result.append(path.resolve())
    return tuple(result)


def inside(path: Path, roots: Sequence[Path]) -> bool:
    """Is the resolved *path* one of *roots* or below one?"""
    return any(path == r or path.is_relative_to(r) for r in roots)


def _copy(src: Path, dst: Path) -> None:
    """Copy a file or a directory tree; never write through a symlink at *dst*."""
    if dst.is_symlink():
        dst.unlink()
    if src.is_dir():
        shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)
    else:
        shutil.copy2(src, dst)
