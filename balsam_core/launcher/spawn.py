"""Starting one task process: ``posix_spawn`` through the C library where it can.

``subprocess.Popen`` spends about 0.2 ms of the launcher's CPU per start in Python
(encoding the environment, searching ``PATH``, an error pipe, the output files opened
and closed in the parent); a launcher running short tasks on every core spends a good
part of its time there.  glibc's ``posix_spawn`` (a ``vfork``-like clone) with file
actions does the same in C: the child changes into the working directory, opens its
output files, closes every inherited descriptor above 2 and starts its own process
group.
Python's ``os.posix_spawn`` cannot change directory, so the C functions are called
through :mod:`ctypes`; that needs glibc 2.34 (``addchdir_np``, ``addclosefrom_np``).
Elsewhere :func:`spawn` falls back to ``Popen`` with the same effect.

Either way the child's stdin is ``/dev/null``, stdout and stderr are appended to the
given files (created if missing), no descriptor of the launcher is inherited, it leads
a process group of its own (which holds what it forks: ended with ``killpg``; a signal
to the launcher's group, such as a terminal's Ctrl-C, does not reach it), SIGPIPE and
SIGXFSZ are back at their defaults, and the executable is found on the ``PATH`` of
*env*, as ``Popen`` does.  Failures raise what ``Popen`` raises: OSError (with the
missing file's name for ENOENT) or ValueError for an argument with a NUL byte.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import sys
import threading
from array import array
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

#: How output files are opened by the child: appended to, created if missing.
OUTPUT_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND

#: ``subprocess.Popen`` arguments for a child leading a process group of its own
#: (Python 3.10 has no ``process_group``: a session of its own, which is one too).
OWN_PROCESS_GROUP: dict[str, Any] = (
    {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
)

_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()


class Child(Protocol):
    """A started task process (``subprocess.Popen`` is one)."""

    pid: int

    def poll(self) -> int | None:
        """The exit code once it ended (reaping it; minus the signal number if a
        signal ended it), else None."""


class SpawnedChild:
    """A process started by :func:`spawn` through ``posix_spawn``."""

    __slots__ = ("pid", "returncode")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else: its code is lost
                self.returncode = 255
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


class _Libc:
    """The C library's ``posix_spawn`` family, if it has every part :func:`spawn` needs."""

    #: ``posix_spawnattr_setflags`` flags: a new process group, default dispositions.
    SETPGROUP, SETSIGDEF = 0x02, 0x04
    #: Generous sizes of glibc's opaque types (80, 336 and 128 bytes on x86-64).
    ACTIONS_SIZE, ATTR_SIZE, SIGSET_SIZE = 256, 1024, 256

    def __init__(self) -> None:
        # posix_spawn through CDLL: the call releases the GIL while the parent waits for
        # the child's exec, so the launcher's leasing and reporting threads run meanwhile
        # (holding it measured 10-15 % slower end to end on 1000 short tasks).  The
        # quick calls around it through PyDLL, which keeps the GIL: each release is a
        # chance for another thread to take it, and the hot loop then waits to get it back.
        lib = ctypes.PyDLL(None, use_errno=True)
        self.init = lib.posix_spawn_file_actions_init
        self.destroy = lib.posix_spawn_file_actions_destroy
        self.adddup2 = lib.posix_spawn_file_actions_adddup2
        self.addopen = lib.posix_spawn_file_actions_addopen
        self.addchdir = lib.posix_spawn_file_actions_addchdir_np
        self.addclosefrom = lib.posix_spawn_file_actions_addclosefrom_np
        self.spawn = ctypes.CDLL(None, use_errno=True).posix_spawn
        self.spawn.argtypes = [
            ctypes.POINTER(ctypes.c_int), ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_void_p, ctypes.c_void_p,
        ]
        # One attribute object for every start: a process group of its own (group 0:
        # the child's pid), default dispositions for the signals Python ignores (as
        # Popen's restore_signals).  Not a session of its own: in the launcher's session
        # the task is still found by batch systems that track a job's processes by
        # session (a PBS or Torque MoM without cgroups), and a session per start made
        # 1000 x `true` on 2 cores 6-8 % slower end to end (the kernel's autogrouping
        # gives each session a scheduler group; see bench/README.md).
        self.attr = ctypes.create_string_buffer(self.ATTR_SIZE)
        sigdef = ctypes.create_string_buffer(self.SIGSET_SIZE)
        _check(lib.sigemptyset(sigdef))
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            _check(lib.sigaddset(sigdef, int(sig)))
        _check(lib.posix_spawnattr_init(self.attr))
        _check(lib.posix_spawnattr_setsigdefault(self.attr, sigdef))
        _check(lib.posix_spawnattr_setpgroup(self.attr, 0))
        flags = ctypes.c_short(self.SETPGROUP | self.SETSIGDEF)
        _check(lib.posix_spawnattr_setflags(self.attr, flags))


def _check(rc: int) -> None:
    if rc:
        raise OSError(rc, os.strerror(rc))


def _load_libc() -> _Libc | None:
    if sys.implementation.name != "cpython":  # the arrays hold CPython objects' addresses
        return None
    name = "CS_GNU_LIBC_VERSION"
    version = os.confstr(name) if name in os.confstr_names else None
    if not version or not version.startswith("glibc "):
        return None
    try:
        if tuple(int(x) for x in version.split()[1].split(".")[:2]) < (2, 34):
            return None
        return _Libc()
    except (OSError, AttributeError, ValueError):
        return None


#: None where the fallback (``Popen``) is used.
LIBC = _load_libc()


def spawn(
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str,
    stdin: int,
    stdout_path: str,
    stderr_path: str,
    *,
    libc: _Libc | None = LIBC,
) -> Child:
    """Start *argv* in *cwd* with *env* (see the module docstring); *stdin* is a
    descriptor to read from, relative output paths are in *cwd*."""
    if libc is None:
        return _popen(argv, env, cwd, stdin, stdout_path, stderr_path)
    if not argv:
        raise ValueError("empty command")
    if "" in env or "=" in "\0".join(env):
        raise ValueError(f"illegal environment variable name in {list(env)}")
    args = _StringArray(argv)
    path = _executable(args.first, env, cwd)
    envp = _StringArray(list(map("=".join, env.items())))
    actions = ctypes.create_string_buffer(libc.ACTIONS_SIZE)
    pid = ctypes.c_int()
    _check(libc.init(actions))
    try:
        _check(libc.adddup2(actions, stdin, 0))
        _check(libc.addchdir(actions, _encode(cwd)))  # before the opens: paths relative to it
        _check(libc.addopen(actions, 1, _encode(stdout_path), OUTPUT_FLAGS, 0o644))
        _check(libc.addopen(actions, 2, _encode(stderr_path), OUTPUT_FLAGS, 0o644))
        _check(libc.addclosefrom(actions, 3))
        rc = libc.spawn(ctypes.byref(pid), path, actions, libc.attr, args.pointers, envp.pointers)
    finally:
        libc.destroy(actions)
    if rc:
        _EXECUTABLES.clear()  # a PATH entry may have changed
        missing = argv[0] if os.path.isdir(cwd) else cwd
        raise OSError(rc, os.strerror(rc), missing if rc == errno.ENOENT else argv[0])
    return SpawnedChild(pid.value)


#: Most encoded strings :class:`_StringArray` keeps per thread (a task's own variables,
#: such as its id, are new at every start: the cache starts over when full).
ENCODED_MAX = 4096
_encoded = threading.local()


class _StringArray:
    """A NULL-terminated ``char *[]`` of *strings*, encoded.

    A task's environment is mostly the launcher's: the same strings come back start
    after start.  Each is encoded once per thread and kept, NUL-terminated, with its
    address, so an array is a list of addresses (encoding ~40 variables at every start
    was a third of ``spawn``'s Python time).  The array holds its strings while it lives.
    """

    __slots__ = ("first", "pointers", "_strings", "_array")

    def __init__(self, strings: Sequence[str]) -> None:
        cache: dict[str, tuple[bytes, int]] | None = getattr(_encoded, "cache", None)
        if cache is None or len(cache) > ENCODED_MAX:
            cache = _encoded.cache = {}
        self._strings = [cache.get(s) or _encoded_entry(cache, s) for s in strings]
        self._array = array("Q", [address for _, address in self._strings])
        self._array.append(0)
        #: The first string (argv[0]), encoded.
        self.first = self._strings[0][0][:-1] if self._strings else b""
        #: The array's address, for C.
        self.pointers = self._array.buffer_info()[0]


def _encoded_entry(cache: dict[str, tuple[bytes, int]], text: str) -> tuple[bytes, int]:
    """*text* encoded and NUL-terminated, with the address of its bytes; now cached."""
    data = _encode(text) + b"\0"
    entry = cache[text] = (data, id(data) + _BYTES_DATA)
    return entry


def _bytes_data_offset() -> int:
    """Where a ``bytes`` object's characters start, from its address (``id`` in
    CPython): a fixed offset, and ``id() +`` it costs a tenth of a ``ctypes.cast``."""
    probe = b"probe"
    return (ctypes.cast(probe, ctypes.c_void_p).value or 0) - id(probe)


_BYTES_DATA = _bytes_data_offset()


def _popen(
    argv: Sequence[str], env: Mapping[str, str], cwd: str, stdin: int, stdout_path: str,
    stderr_path: str,
) -> subprocess.Popen[bytes]:
    stdout = os.open(os.path.join(cwd, stdout_path), OUTPUT_FLAGS | os.O_CLOEXEC, 0o644)
    try:
        stderr = os.open(os.path.join(cwd, stderr_path), OUTPUT_FLAGS | os.O_CLOEXEC, 0o644)
        try:
            return subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=stdin, stdout=stdout, stderr=stderr,
                close_fds=True, **OWN_PROCESS_GROUP,
            )
        finally:
            os.close(stderr)
    finally:
        os.close(stdout)


def _encode(text: str) -> bytes:
    data = text.encode(_FS_ENCODING, _FS_ERRORS)
    if b"\0" in data:
        raise ValueError(f"embedded null byte in {text!r}")
    return data


#: (command name, PATH) -> the executable found, for the next start of that command.
_EXECUTABLES: dict[tuple[bytes, str], bytes] = {}


def _executable(name: bytes, env: Mapping[str, str], cwd: str) -> bytes:
    """*name* itself if it holds a slash (the child resolves it in *cwd*), else the
    first executable file of that name on *env*'s ``PATH``."""
    if b"/" in name:
        return name
    search = env.get("PATH", os.defpath)
    found = _EXECUTABLES.get((name, search))
    if found is not None:
        return found
    directories = search.split(os.pathsep)
    for directory in directories:
        where = os.path.join(cwd, directory) if directory else cwd
        candidate = os.path.join(where, os.fsdecode(name))
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            found = _encode(candidate)
            if all(os.path.isabs(d) for d in directories):  # else it depends on cwd
                _EXECUTABLES[(name, search)] = found
            return found
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), os.fsdecode(name))
