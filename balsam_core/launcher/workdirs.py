"""Task working directories: made if missing, kept inside the allowed roots.

A task's directory is ``<data>/<workdir>``.  The launcher's leasing thread prepares the
directories of the tasks it leases, with their (empty) output files, ahead of their
start (:meth:`Workdirs.prepare_ahead`): a directory and two files cost 0.03 ms (tmpfs)
to several ms (ext4 on this project's VMs) of kernel time, which the hot loop no
longer spends (the files are made with ``mknod``: one system call each, no
descriptor).  The hot loop's own :meth:`Workdirs.prepare` at the start then costs
nothing; for a task not prepared ahead it is one ``mkdir``.

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


class Workdirs:
    """Makes and checks working directories below *data_dir* (see the module docstring)."""

    def __init__(self, data_dir: Path, roots: Sequence[Path]) -> None:
        self._data_dir = str(data_dir)
        self._roots = tuple(roots)
        self._checked_parents: set[str] = set()
        #: Directories prepared ahead and not yet prepared again.
        self._made: set[str] = set()

    def prepare(self, workdir: str) -> str:
        """The absolute path of *workdir* (relative to the data directory), which exists
        when this returns.  Raises :class:`BalsamError` for one outside the allowed roots
        (nothing is created then), OSError if it cannot be made."""
        path = os.path.join(self._data_dir, workdir)
        if path in self._made:  # by prepare_ahead: checked already
            self._made.discard(path)
            return path
        parent = os.path.dirname(path)
        if parent not in self._checked_parents:
            self._check(parent, path)
            os.makedirs(parent, exist_ok=True)
            self._checked_parents.add(parent)
        try:
            os.mkdir(path)  # usually new: one system call
        except FileExistsError:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                self._check(path, path)
        return path

    def prepare_ahead(self, workdir: str) -> None:
        """:meth:`prepare` now, and create the task's (empty) output files; the next
        :meth:`prepare` of *workdir* then costs nothing."""
        path = self.prepare(workdir)
        for name in (STDOUT_FILE, STDERR_FILE):
            try:  # one system call, no descriptor
                os.mknod(os.path.join(path, name), stat.S_IFREG | 0o644)
            except FileExistsError:
                pass
        self._made.add(path)

    def _check(self, resolved: str, path: str) -> None:
        """Refuse *path* if *resolved* (itself or its parent) lies outside the roots."""
        if not inside(Path(os.path.realpath(resolved)), self._roots):
            raise BalsamError(
                f"working directory {path} resolves to {os.path.realpath(path)}, "
                "outside the site's data directory and [site] allowed_roots"
            )
