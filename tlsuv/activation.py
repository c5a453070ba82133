"""Listening sockets handed over by whoever started us, and telling them how we are doing.

Why this module exists
======================

A server that binds its own port refuses connections while it restarts: the
old process has closed the socket and the new one has not yet bound it.  If
instead *someone else* holds the listening socket and hands it to each new
server process, the kernel keeps completing TCP handshakes into the
socket's accept queue while no process is accepting, and the next one finds
them waiting.  Nothing is refused, nothing is reset.

Two ways in:

* **systemd's socket activation** (``sd_listen_fds(3)``): the service
  manager opens the sockets of a ``.socket`` unit and starts the service
  with them as file descriptors 3, 4, ... and three environment variables:
  ``LISTEN_FDS`` (how many), ``LISTEN_PID`` (the pid they are meant for)
  and, optionally, ``LISTEN_FDNAMES`` (colon-separated names).  tlsuv's own
  upgrade (:mod:`tlsuv.upgrade`) uses the very same protocol to hand its
  sockets to the next process tree, so one code path serves both.
* **``--listen-fd N``** (repeatable) for any other supervisor (s6, runit
  with a socket helper, a container entry point...): descriptor N is a
  listening socket.

:func:`parse_environment` is the protocol, with no I/O; :func:`take_environment`
reads and clears the variables; :func:`listening_socket` checks that a
descriptor really is what we can serve on; :func:`inherited_sockets` puts
them together for a command line.  :func:`notify` speaks the other half of
systemd's protocol (``sd_notify(3)``: ``READY=1``, ``MAINPID=``), and
:func:`write_pid_file` / :func:`remove_pid_file` serve supervisors that find
the server by its PID file.

The traps, and how each is handled
==================================

* **Variables meant for someone else.**  The variables are inherited by
  every child, so a process must use them only if ``LISTEN_PID`` is its own
  pid (a shell wrapper that runs Python without ``exec`` gets them too, and
  must not steal its child's sockets).  Whatever the pid, they are removed
  from our environment after reading (as ``sd_listen_fds(1)`` does), so a
  handler's subprocess never sees them; the descriptors get ``FD_CLOEXEC``
  for the same reason.
* **A descriptor that is not what it claims.**  A unit that hands over a
  UDP or a UNIX socket, a socket that was bound but never listened, a
  closed descriptor: each is one line on stderr and exit status 2, before
  anything is served -- never an exception deep inside libuv.
* **The backlog.**  libuv cannot accept on a socket without calling
  ``listen()`` itself; on a socket that already listens, Linux only updates
  the queue length, so queued connections are kept but a ``.socket`` unit's
  ``Backlog=`` is replaced by tlsuv's (4096, capped by
  ``net.core.somaxconn``).
* **Names are optional and may disagree.**  systemd's own library rejects
  ``LISTEN_FDNAMES`` with a different number of names than ``LISTEN_FDS``;
  so does this module (one line, exit 2), rather than guess which name
  belongs to which socket.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .errors import TLSUVError

log = logging.getLogger("tlsuv.activation")

# sd_listen_fds(3): "the first passed file descriptor is fd 3" (SD_LISTEN_FDS_START).
LISTEN_FDS_START: Final = 3
# The name sd_listen_fds_with_names(3) gives a socket that the manager did not name.
UNNAMED: Final = "unknown"
# systemd refuses names longer than this (FDNAME_MAX) or with characters outside
# printable ASCII or containing ':'; a longer one is a corrupt variable, not a name.
NAME_MAX: Final = 255
# A typo guard: systemd passes at most a few hundred sockets to one service, and
# a number like 10**9 in LISTEN_FDS is garbage, not a plan.
LISTEN_FDS_MAX: Final = 4096

ENV_VARS: Final = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


class ActivationError(TLSUVError):
    """Inherited sockets that cannot be used: a malformed variable, or not a listening TCP socket."""


@dataclass(frozen=True)
class Inherited:
    """What ``LISTEN_FDS``/``LISTEN_FDNAMES`` say: descriptors 3.. and their names."""

    fds: tuple[int, ...]
    names: tuple[str, ...]


def parse_environment(environ: Mapping[str, str], pid: int) -> Inherited | None:
    """The sd_listen_fds protocol, without I/O.

    Returns None when the variables are absent, name another process, or
    pass no descriptor (the caller binds as usual); raises
    :class:`ActivationError` when they are malformed.
    """
    count_text = environ.get("LISTEN_FDS")
    pid_text = environ.get("LISTEN_PID")
    if count_text is None or pid_text is None:
        return None
    try:
        target = int(pid_text)
    except ValueError:
        raise ActivationError(f"LISTEN_PID is not a process id: {pid_text!r}") from None
    if target != pid:
        return None
    try:
        count = int(count_text)
    except ValueError:
        raise ActivationError(f"LISTEN_FDS is not a number: {count_text!r}") from None
    if not 0 <= count <= LISTEN_FDS_MAX:
        raise ActivationError(f"LISTEN_FDS out of range: {count_text!r}")
    if count == 0:
        return None
    names_text = environ.get("LISTEN_FDNAMES")
    if names_text is None:
        names = (UNNAMED,) * count
    else:
        names = tuple(names_text.split(":"))
        if len(names) != count:
            raise ActivationError(
                f"LISTEN_FDNAMES has {len(names)} name(s) but LISTEN_FDS passes {count} socket(s)")
        for name in names:
            if len(name) > NAME_MAX or not name.isprintable():
                raise ActivationError(f"LISTEN_FDNAMES holds an invalid name: {name[:40]!r}")
    return Inherited(tuple(range(LISTEN_FDS_START, LISTEN_FDS_START + count)), names)


def take_environment(
    environ: MutableMapping[str, str] | None = None, pid: int | None = None
) -> Inherited | None:
    """Read the variables for this process and remove them, whatever they said."""
    env: MutableMapping[str, str] = os.environ if environ is None else environ
    me = os.getpid() if pid is None else pid
    try:
        found = parse_environment(env, me)
        if found is None and "LISTEN_FDS" in env and env.get("LISTEN_PID", "").strip() != str(me):
            # Not an error (the protocol says: not ours), but the usual cause is
            # a wrapper script that runs us without exec, and then nothing works.
            log.warning("LISTEN_FDS is set for pid %s, not for this process (pid %d): ignored; "
                        "start tlsuv with exec so it keeps the pid the sockets were passed to",
                        env.get("LISTEN_PID", "(unset)"), me)
        return found
    finally:
        for name in ENV_VARS:
            env.pop(name, None)


_FAMILIES: Final = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}


def listening_socket(fd: int, what: str | None = None) -> socket.socket:
    """Wrap descriptor ``fd`` after checking it is a listening TCP socket; it becomes close-on-exec.

    Raises :class:`ActivationError` naming the descriptor and what is wrong
    with it; the descriptor is left open either way (it is not ours to close).
    """
    label = what or f"descriptor {fd}"
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        reason = "not open" if exc.errno == errno.EBADF else exc.strerror
        raise ActivationError(f"{label}: {reason}") from exc
    if not stat.S_ISSOCK(mode):
        raise ActivationError(f"{label} is not a socket")
    sock = socket.socket(fileno=fd)  # family and type are read from the descriptor
    try:
        if sock.family not in _FAMILIES:
            raise ActivationError(f"{label} is an {_family_name(sock.family)} socket; "
                                  "tlsuv serves TCP over IPv4 or IPv6")
        if sock.type != socket.SOCK_STREAM:
            raise ActivationError(f"{label} is not a stream (TCP) socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ActivationError(f"{label} is a TCP socket that is not listening")
    except BaseException:
        sock.detach()  # do not close what we were lent
        raise
    os.set_inheritable(fd, False)
    return sock


def _family_name(family: int) -> str:
    with contextlib.suppress(ValueError):
        return socket.AddressFamily(family).name
    return str(family)


def describe(sock: socket.socket) -> str:
    """``127.0.0.1:4433`` or ``[::1]:4433``, for log lines."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def inherited_sockets(
    listen_fds: Sequence[int] = (), environ: MutableMapping[str, str] | None = None
) -> list[tuple[socket.socket, str]]:
    """The sockets to serve on instead of binding: ``(socket, name)`` pairs, or ``[]`` to bind.

    Sockets passed with ``LISTEN_FDS`` (by systemd, or by the previous
    process tree during an upgrade) come first and win: ``listen_fds`` (the
    ``--listen-fd`` numbers) are then ignored, because after an upgrade the
    original numbers no longer mean anything.  Raises
    :class:`ActivationError` for anything that cannot be served on.
    """
    passed = take_environment(environ)
    if passed is not None:
        if listen_fds:
            log.info("sockets passed with LISTEN_FDS replace --listen-fd %s",
                     ",".join(map(str, listen_fds)))
        pairs = [(listening_socket(fd, f"descriptor {fd} (LISTEN_FDS)"), name)
                 for fd, name in zip(passed.fds, passed.names, strict=True)]
    else:
        seen: set[int] = set()
        pairs = []
        for fd in listen_fds:
            if fd in seen:
                raise ActivationError(f"--listen-fd {fd} given twice")
            seen.add(fd)
            pairs.append((listening_socket(fd, f"--listen-fd {fd}"), "listen-fd"))
    for sock, name in pairs:
        log.info("serving on inherited socket %s (descriptor %d, %s, name %s)", describe(sock),
                 sock.fileno(), _FAMILIES[sock.family], name)
    return pairs


# -- sd_notify: telling the service manager -------------------------------------------


def notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (``"READY=1"``, ``"MAINPID=123"``...) to ``$NOTIFY_SOCKET``; False if none.

    Best effort, as sd_notify(3): a service manager that is gone must not
    stop a server.  Only the main process of a service may notify with
    systemd's default ``NotifyAccess=main``; workers never call this.
    """
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # the abstract namespace
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("NOTIFY_SOCKET is neither a path nor an abstract name: %r", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:
        log.warning("cannot notify the service manager (%s): %s", message.partition("\n")[0],
                    exc.strerror)
        return False
    return True


# -- PID files ------------------------------------------------------------------------------


def write_pid_file(path: str | os.PathLike[str], pid: int | None = None) -> None:
    """Write ``pid`` (ours by default) to ``path`` atomically: a reader never sees half a number."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{os.getpid() if pid is None else pid}\n")
    tmp.replace(target)


def remove_pid_file(path: str | os.PathLike[str]) -> None:
    """Remove ``path`` if it still names this process (after an upgrade it names the new one)."""
    target = Path(path)
    with contextlib.suppress(OSError, ValueError):
        if int(target.read_text().strip()) == os.getpid():
            target.unlink()


# -- the command line ----------------------------------------------------------------------


def _descriptor(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a file descriptor number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--listen-fd`` and ``--pid-file``."""
    g = parser.add_argument_group("restarts and upgrades")
    g.add_argument("--listen-fd", type=_descriptor, action="append", default=[], metavar="N",
                   help="serve on the listening TCP socket inherited as descriptor N instead of binding "
                        "--host/--port (repeatable); systemd's LISTEN_FDS is read without this flag")
    g.add_argument("--pid-file", default=None, metavar="FILE",
                   help="write the main process's pid to FILE (rewritten by the new process after an "
                        "upgrade, removed at exit)")


__all__ = [
    "LISTEN_FDS_START",
    "ActivationError",
    "Inherited",
    "add_arguments",
    "describe",
    "inherited_sockets",
    "listening_socket",
    "notify",
    "parse_environment",
    "remove_pid_file",
    "take_environment",
    "write_pid_file",
]
