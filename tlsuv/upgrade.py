"""In-place upgrades: start the next process tree on the same listening sockets.

Why this module exists
======================

``SIGUSR2`` to the parent of ``--workers`` (:class:`tlsuv.workers.Supervisor`)
starts a new process tree from the code and configuration on disk now, and
the old tree steps aside only once the new one serves.  The listening
sockets are never closed and never bound again: the new tree *inherits*
them, so a connection the kernel has queued on a socket is accepted by
whichever tree gets to it first, and none is refused or reset.

The hand-over is systemd's socket-activation protocol (:mod:`tlsuv.activation`):
the old parent forks, places its listening sockets at descriptors 3, 4, ...,
sets ``LISTEN_FDS``/``LISTEN_PID``/``LISTEN_FDNAMES`` and executes
``sys.executable`` with the original command line (``sys.orig_argv``).  The
new process cannot tell an upgrade from a start by systemd, and needs no
code of its own for it -- except one thing: it says when it serves.  One
more descriptor, a pipe named by ``TLSUV_UPGRADE_FD``, carries a single
``ready`` line once every new worker listens; the old parent then drains
its own workers exactly as on SIGTERM and exits.

The model is nginx's: the new parent is a child of the old one until the
old one exits, and then an orphan, adopted by init or by the nearest
subreaper (systemd, for a service).  Its pid is new.  So:

* under systemd the old parent tells the manager the new main pid
  (``MAINPID=``, with ``Type=notify``) before it exits, and
  ``ExecReload=kill -USR2 $MAINPID`` works again next time;
* with ``--pid-file`` the new parent rewrites the file once it serves;
* a supervisor that watches its direct child (supervisord, runit, a
  container's PID 1) sees the old parent exit and thinks the service died:
  there, restart instead (with the socket held by the supervisor, see
  ``--listen-fd``).

The traps, and how each is handled
==================================

* **Descriptors in the way.**  Target descriptors 3.. may already hold
  something else in the forked child (the selector, a pipe).  Every source
  is first duplicated *above* the target range, then moved down, so no
  source is overwritten before it is copied.  Everything else is
  close-on-exec (Python's default), so the new tree gets the sockets, the
  pipe and stdio, nothing more.
* **Only the successor may use them.**  ``LISTEN_PID`` is set in the forked
  child, just before ``execve``, to its own pid (systemd does the same),
  and the pipe's variable carries the pid too; both are removed from the
  environment once read.
* **A successor that fails.**  It may exit (a bad certificate: status 2),
  crash, or hang.  The old parent watches its exit status, the pipe's end
  of file and a deadline (:data:`READY_TIMEOUT`); on any of them it logs
  why, stops the successor if it still runs, and keeps serving.
* **An old parent that gives up.**  The new parent watches its end of the
  pipe: if the old one closes it before hearing ``ready`` (a SIGTERM during
  the upgrade, or it died), the new tree drains and exits instead of
  serving on behind a parent that stopped.  Closing the pipe is also how
  the old parent stops it: a signal might reach it twice (once from the
  old parent, once from a terminal or an init system) and mean "abort".
* **Between fork and exec** the child only duplicates descriptors, sets
  two variables and executes; it never logs.  That is safe in Python
  because the parent that forks has no other thread (tlsuv.workers's
  rule), so no lock can be held by a thread that does not exist in the
  child.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import sys
import time
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from . import activation

if TYPE_CHECKING:
    import socket

log = logging.getLogger("tlsuv.upgrade")

ENV_READY_FD: Final = "TLSUV_UPGRADE_FD"
READY: Final = b"ready\n"
# Starting a tree is loading certificates and forking workers: seconds at most
# on a loaded host.  A successor that has not served after a minute is stuck,
# and an upgrade must not stay "in progress" (refusing the next one) forever.
READY_TIMEOUT: Final = 60.0
# What a forked child that could not execute the new program exits with (the
# shell's "command not found or not executable").
EXIT_EXEC_FAILED: Final = 127
# A successor that closed the pipe without "ready" is almost always exiting;
# its status is collected within milliseconds, and names the real reason.
EXIT_WAIT: Final = 2.0


@dataclass
class Successor:
    """The new process tree's parent, seen from the old parent while it starts."""

    pid: int
    fd: int  # our end of the readiness pipe (non-blocking)
    deadline: float
    started: float = field(default_factory=time.monotonic)
    hung_up: bool = False  # closed the pipe without reporting ready

    def poll(self) -> bool | None:
        """True once it reported ready; False if it closed the pipe without doing so; None: not yet."""
        try:
            data = os.read(self.fd, len(READY))
        except BlockingIOError:
            return None
        except OSError:
            return False
        if data == READY:
            return True
        if not data:
            return False
        log.warning("upgrade: the new process sent %r instead of %r", data, READY)
        return False

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def command_line() -> list[str]:
    """This process's own command line, to run again: the interpreter, its options, the program."""
    return [sys.executable, *sys.orig_argv[1:]]


def spawn(
    sockets: Sequence[tuple[socket.socket, str]],
    argv: Sequence[str] | None = None,
    timeout: float = READY_TIMEOUT,
) -> Successor:
    """Fork and execute ``argv`` (default: :func:`command_line`) with ``sockets`` at descriptors 3...

    Raises OSError if the fork or the pipe fails; a failed ``execve`` is
    reported by the child on stderr and as exit status 127.
    """
    args = list(argv) if argv is not None else command_line()
    count = len(sockets)
    ready_target = activation.LISTEN_FDS_START + count
    env = dict(os.environ)
    env.pop("LISTEN_PID", None)  # set in the child, to the child's pid
    env["LISTEN_FDS"] = str(count)
    env["LISTEN_FDNAMES"] = ":".join(name for _, name in sockets)
    sources = [s.fileno() for s, _ in sockets]
    # Prepared before the fork: the child only duplicates descriptors and executes.
    executable = os.fsencode(args[0])
    encoded = [os.fsencode(a) for a in args]
    r, w = os.pipe()
    for stream in (sys.stdout, sys.stderr):  # or the child would write them again
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        pid = os.fork()
    except OSError:
        os.close(r)
        os.close(w)
        raise
    if pid == 0:  # pragma: no cover - the child executes or exits; coverage cannot follow
        _become_successor([*sources, w], env, ready_target, executable, encoded)
    os.close(w)
    os.set_blocking(r, False)
    return Successor(pid, r, time.monotonic() + timeout)


def _become_successor(sources: list[int], env: dict[str, str], ready_target: int,
                      executable: bytes, argv: list[bytes]) -> None:  # pragma: no cover
    try:
        floor = activation.LISTEN_FDS_START + len(sources)
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor) for fd in sources]
        for i, fd in enumerate(high):
            os.dup2(fd, activation.LISTEN_FDS_START + i)  # inheritable: it survives execve
        pid = os.getpid()
        env["LISTEN_PID"] = str(pid)
        env[ENV_READY_FD] = f"{ready_target}:{pid}"
        os.execve(executable, argv, env)
    except BaseException as exc:
        with contextlib.suppress(BaseException):
            os.write(2, f"tlsuv: cannot start the new process: {exc}\n".encode())
    os._exit(EXIT_EXEC_FAILED)


def take_ready_fd(environ: MutableMapping[str, str] | None = None) -> int | None:
    """The readiness pipe an upgrading parent gave this process, or None; the variable is removed."""
    env: MutableMapping[str, str] = os.environ if environ is None else environ
    text = env.pop(ENV_READY_FD, None)
    if text is None:
        return None
    fd_text, _, pid_text = text.partition(":")
    try:
        fd, pid = int(fd_text), int(pid_text)
    except ValueError:
        log.warning("%s is malformed (%r): ignored", ENV_READY_FD, text)
        return None
    if pid != os.getpid():
        return None  # meant for another process (we were started by it without exec)
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            log.warning("%s names descriptor %d, which is not a pipe: ignored", ENV_READY_FD, fd)
            return None
    except OSError:
        log.warning("%s names descriptor %d, which is not open: ignored", ENV_READY_FD, fd)
        return None
    os.set_inheritable(fd, False)
    return fd


def report_ready(fd: int) -> None:
    """Tell the old parent this tree serves; it then drains itself.  Closes ``fd``."""
    try:
        os.write(fd, READY)
    except OSError as exc:  # it is gone: nobody waits, we serve anyway
        log.warning("upgrade: cannot tell the old process we serve: %s", exc.strerror)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


__all__ = ["READY_TIMEOUT", "Successor", "command_line", "report_ready", "spawn", "take_ready_fd"]
