"""Task working directories: made if missing, kept inside the allowed roots.

A task's directory is ``<data>/<workdir>``.  The launcher's leasing thread prepares the
directories of the tasks it leases, with their (empty) output files, ahead of their
start (:meth:`Workdirs.prepare_ahead`): a directory and two files cost 0.03 ms (tmpfs)
to several ms (ext4 on this project's VMs) of kernel time, which the hot loop no
longer spends.  At the start the hot loop
prepares again (:meth:`Workdirs.prepare`), which costs one ``lstat`` when it was done.

A directory's parent (``<data>/<workflow>`` for the default layout) is resolved once per
launcher and remembered; the directory itself is resolved only when it is a symlink.
(A parent turned into a symlink after it was checked is not noticed: the data directory
belongs to the site's owner, and this check is against task specs that point outside
it, not against the owner racing their own launcher.)
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from ..errors import BalsamError
from ..models import STDERR_FILE, STDOUT_FILE
from ..processing.staging import inside
from .spawn import OUTPUT_FLAGS


class Workdirs:
    """Makes and checks working directories below *data_dir* (see the module docstring)."""

    def __init__(self, data_dir: Path, roots: Sequence[Path]) -> None:
        self._data_dir = str(data_dir)
        self._roots = tuple(roots)
        self._checked_parents: set[str] = set()

    def prepare(self, workdir: str) -> str:
        """The absolute path of *workdir* (relative to the data directory), which exists
        when this returns.  Raises :class:`BalsamError` for one outside the allowed roots
        (nothing is created then), OSError if it cannot be made."""
        path = os.path.join(self._data_dir, workdir)
        parent = os.path.dirname(path)
        if parent not in self._checked_parents:
            self._check(parent, path)
            os.makedirs(parent, exist_ok=True)
            self._checked_parents.add(parent)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            try:
                os.mkdir(path)
                return path
            except FileExistsError:  # made meanwhile by another thread or process
                mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            self._check(path, path)
        return path

    def prepare_ahead(self, workdir: str) -> None:
        """:meth:`prepare`, and create the task's output files."""
        path = self.prepare(workdir)
        for name in (STDOUT_FILE, STDERR_FILE):
            os.close(os.open(os.path.join(path, name), OUTPUT_FLAGS | os.O_CLOEXEC, 0o644))

    def _check(self, resolved: str, path: str) -> None:
        """Refuse *path* if *resolved* (itself or its parent) lies outside the roots."""
        if not inside(Path(os.path.realpath(resolved)), self._roots):
            raise BalsamError(
                f"working directory {path} resolves to {os.path.realpath(path)}, "
                "outside the site's data directory and [site] allowed_roots"
            )
