"""Certificate reload without a restart: on SIGHUP, or when polled files change.

Why this module exists
======================

Public certificates now live for weeks, not years, so a server that must be
restarted to serve a renewed one is not a server you can leave running.  A
:class:`Reloader` knows the files a server was started with
(:class:`CertificateFiles`: the certificate chain and key, each SNI
certificate and key, the client CA file) and, on ``SIGHUP`` or when polling
finds that their content changed, re-reads all of them, builds a complete new
set of Contexts and swaps it in through :class:`tlsuv.policy.ContextSet`.
New handshakes get the new certificates; connections already open keep the
Context they were made with and are not touched.

The traps, and how each is handled
==================================

* **Check everything before switching anything.**  The whole set is built
  first -- every key against its certificate, every PEM block of every chain
  (:func:`tlsuv.certs.parse_certificates`: a chain cut short by a
  half-written file still parses, one certificate short), every SNI
  certificate against its name -- and swapped in one assignment only if all
  of it holds.  A reload that fails keeps serving the old set, logs one line
  naming the file and the reason, and is counted
  (:attr:`Reloader.reloads_failed`); the process never dies of it.

* **What is served is what was hashed.**  Each attempt reads every file
  exactly once; the Contexts are built from those bytes, and the SHA-256 of
  those bytes is what polling compares next time.  Reading a file twice
  (once to hash, once to load) could load a newer file than the one hashed
  and never notice.

* **Modification times lie.**  Deploy tools write a temporary file and
  rename it over the old one (a new inode, maybe an old mtime: ``cp -p``,
  ``rsync -t``, a Kubernetes secret volume's symlink swap), so polling
  compares content, not ``stat``.  The files are a few KB; hashing them every
  few seconds costs nothing measurable.

* **The same broken content is reported once.**  A failed attempt records
  the digest it read, so polling does not retry (and log) it every interval;
  the next change, or a ``SIGHUP``, tries again.

* **A certificate and its key are two files.**  A tool that renames them one
  after the other leaves a moment in which they do not match; a poll in that
  moment fails (one line) and the next, seeing the second file change,
  succeeds.  A deploy hook that signals after both are in place never sees
  it.

* **Workers.**  Every worker is forked with the parent's :class:`Reloader`
  (and the front Context, hence the same session-ticket keys) and starts its
  own ``SIGHUP`` handle and poll timer; the parent forwards ``SIGHUP`` to
  each worker (:mod:`tlsuv.workers`).  A worker restarted after a reload is
  forked from the parent, which still holds the certificates of the start:
  :meth:`Reloader.start` therefore compares the files at once and catches up.

* **Session tickets survive reloads.**  The ticket keys belong to the front
  Context, which a reload never replaces (:mod:`tlsuv.policy`), so a ticket
  issued before a reload resumes after it, on any worker, until it expires
  (OpenSSL's session timeout: 2 hours unless
  ``ServerPolicy.session_timeout`` says otherwise).  A resumed session skips the certificate: such a client
  still has the old certificate's session.  After a key compromise,
  restart: a new process has new ticket keys.

* **Never keep the loop alive.**  The signal and timer handles are
  unreferenced, like the stats timer: a server that closed lets
  ``loop.run()`` return.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import signal
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Final

import pyuv
from OpenSSL import SSL

from . import _cli
from .certs import CertificateBundle, CertificateError, expires_soon, log_certificate, parse_certificates
from .errors import TLSUVError
from .policy import ContextSet, PolicyError, ServerPolicy, build_context_set
from .stats import certificate_expiry

if TYPE_CHECKING:
    from .stats import Stats

log = logging.getLogger("tlsuv.reload")

# A certificate that is about to end is re-checked this often even when
# nothing reloads, so a server left alone for weeks warns every day, not only
# at the start.
EXPIRY_CHECK_EVERY: Final = 24 * 3600.0


@dataclass(frozen=True)
class CertificateFiles:
    """The files a server's certificates come from.  ``None`` or empty: not from a file."""

    cert: str | None = None
    key: str | None = None
    # (SNI name, certificate file, key file)
    sni: tuple[tuple[str, str, str], ...] = ()
    client_ca: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a certificate file needs its key file")

    def paths(self) -> list[tuple[str, str]]:
        """``(what, path)`` for every file, in a fixed order."""
        out: list[tuple[str, str]] = []
        if self.cert is not None and self.key is not None:
            out += [("certificate", self.cert), ("key", self.key)]
        for name, cert, key in self.sni:
            out += [(f"SNI {name} certificate", cert), (f"SNI {name} key", key)]
        if self.client_ca is not None:
            out.append(("client CA", self.client_ca))
        return out

    def read(self) -> Snapshot:
        """Every file's bytes (or why it could not be read), and their digest."""
        data: dict[str, bytes] = {}
        errors: dict[str, OSError] = {}
        digest = hashlib.sha256()
        for _, path in self.paths():
            if path in data or path in errors:
                continue  # the same file named twice (a combined PEM)
            try:
                with open(path, "rb") as f:
                    content = f.read()
            except OSError as exc:
                errors[path] = exc
                entry = b"error:" + str(exc.errno).encode()
            else:
                data[path] = content
                entry = b"data:" + content
            encoded = path.encode("utf-8", "surrogateescape")
            for part in (encoded, entry):
                digest.update(len(part).to_bytes(8, "big"))
                digest.update(part)
        return Snapshot(data, errors, digest.digest())

    def policy(self, settings: ServerPolicy, snapshot: Snapshot) -> ServerPolicy:
        """``settings`` with the certificates, keys and CA of ``snapshot``; errors name the file."""
        certificate = settings.certificate
        if self.cert is not None and self.key is not None:
            certificate = self._bundle(snapshot, self.cert, self.key)
        sni = settings.sni
        if self.sni:
            sni = {name: self._bundle(snapshot, cert, key) for name, cert, key in self.sni}
        client_ca = settings.client_ca
        if self.client_ca is not None:
            client_ca = snapshot.get(self.client_ca, "client CA")
            parse_certificates(client_ca, f"client CA file {self.client_ca}")
        return replace(settings, certificate=certificate, sni=sni, client_ca=client_ca)

    @staticmethod
    def _bundle(snapshot: Snapshot, cert: str, key: str) -> CertificateBundle:
        return CertificateBundle(snapshot.get(cert, "certificate"), snapshot.get(key, "key"),
                                 cert_file=cert, key_file=key)


@dataclass(frozen=True)
class Snapshot:
    """What one read of the files found."""

    data: dict[str, bytes]
    errors: dict[str, OSError]
    digest: bytes

    def get(self, path: str, what: str) -> bytes:
        """The bytes read from ``path``; :class:`CertificateError` saying why there are none."""
        exc = self.errors.get(path)
        if exc is None:
            return self.data[path]
        if isinstance(exc, FileNotFoundError):
            raise CertificateError(f"{what} file not found: {path}") from exc
        if isinstance(exc, IsADirectoryError):
            raise CertificateError(f"{what} file is a directory: {path}") from exc
        raise CertificateError(f"cannot read {what} file {path}: {exc.strerror or exc}") from exc


class Reloader:
    """A server's certificates from files, reloaded on ``SIGHUP`` or when the files change.

    Building one reads the files and builds the Contexts (raising
    :class:`~tlsuv.certs.CertificateError` or
    :class:`~tlsuv.policy.PolicyError`, as at any start); give
    :attr:`context` to :class:`~tlsuv.Server`, :meth:`log_certificates`
    to say what is served, then :meth:`start` on the server's loop.
    ``settings`` carries everything that is not a file (ALPN, versions,
    ...) and the certificates that are not from files.  The
    counters are for monitoring: :attr:`reloads_ok`, :attr:`reloads_failed`,
    :attr:`last_reload` (wall-clock time of the last good load; the first
    load counts) and :attr:`last_error`.
    """

    def __init__(
        self,
        files: CertificateFiles,
        settings: ServerPolicy | None = None,
        *,
        interval: float | None = None,
    ) -> None:
        if interval is not None and not interval > 0:
            raise ValueError("interval must be positive or None")
        self.files = files
        self.settings = settings or ServerPolicy()
        self.interval = interval
        snapshot = files.read()
        self.contexts: ContextSet = build_context_set(files.policy(self.settings, snapshot))
        self._digest = snapshot.digest
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.last_reload = time.time()
        self.last_error: str | None = None
        self._handles: list[pyuv.Handle] = []
        self._watchers: list[Stats] = []

    @property
    def context(self) -> SSL.Context:
        """The Context to give the server (the set's front; it never changes)."""
        return self.contexts.front

    def watch(self, stats: Stats) -> None:
        """Keep ``stats`` (a server's, for tlsuv.metrics) told of reloads and of certificate expiry."""
        self._watchers.append(stats)
        self._publish(stats)

    def _publish(self, stats: Stats) -> None:
        stats.reloads_ok = self.reloads_ok
        stats.reloads_failed = self.reloads_failed
        # The metric's promise: the time of the last good *reload* (0 until there is one).
        stats.last_reload_time = self.last_reload if self.reloads_ok else 0.0
        policy = self.contexts.policy
        stats.certificates = certificate_expiry(policy) if policy is not None else {}

    # -- reloading -------------------------------------------------------------

    def reload(self, why: str = "reload") -> bool:
        """Re-read every file and swap the new certificates in; False (logged, counted) if they are bad."""
        return self._attempt(self.files.read(), why)

    def poll(self) -> bool | None:
        """Reload if the files' content changed since the last attempt; None if it did not."""
        snapshot = self.files.read()
        if snapshot.digest == self._digest:
            return None
        return self._attempt(snapshot, "certificate files changed")

    def _attempt(self, snapshot: Snapshot, why: str) -> bool:
        self._digest = snapshot.digest
        try:
            return self._swap(snapshot, why)
        finally:
            for stats in self._watchers:
                self._publish(stats)

    def _swap(self, snapshot: Snapshot, why: str) -> bool:
        try:
            self.contexts.reload(self.files.policy(self.settings, snapshot))
        except (CertificateError, PolicyError) as exc:
            self._failed(why, str(exc))
            return False
        except (TLSUVError, SSL.Error, OSError, ValueError) as exc:  # not foreseen: still not fatal
            self._failed(why, f"{type(exc).__name__}: {exc}")
            return False
        self.reloads_ok += 1
        self.last_reload = time.time()
        self.last_error = None
        log.info("%s: certificates reloaded (reloads so far: %d ok, %d failed)", why, self.reloads_ok,
                 self.reloads_failed)
        self.log_certificates()
        return True

    def _failed(self, why: str, error: str) -> None:
        self.reloads_failed += 1
        self.last_error = error
        log.error("%s: reload failed, still serving the previous certificates: %s", why, error)

    def log_certificates(self, *, only_expiring: bool = False) -> None:
        """One line per served certificate (subject, names, expiry); a warning near the end."""
        for role, cert in self.contexts.served():
            if not only_expiring or expires_soon(cert):
                log_certificate(log, role, cert)

    # -- on a loop -------------------------------------------------------------

    def start(self, loop: pyuv.Loop, *, sighup: bool = True) -> None:
        """Reload on SIGHUP, poll every :attr:`interval`, re-check expiry daily; catch up now.

        The files are compared right away: a worker forked after a reload
        from a parent that still holds the first certificates catches up.
        """
        if sighup:
            sig = pyuv.Signal(loop)
            sig.start(lambda h, signum: self.reload("SIGHUP"), signal.SIGHUP)
            self._handles.append(sig)
        if self.interval is not None:
            poll = pyuv.Timer(loop)
            poll.start(lambda t: self.poll(), self.interval, self.interval)
            self._handles.append(poll)
        expiry = pyuv.Timer(loop)
        expiry.start(lambda t: self.log_certificates(only_expiring=True), EXPIRY_CHECK_EVERY,
                     EXPIRY_CHECK_EVERY)
        self._handles.append(expiry)
        for h in self._handles:
            h.ref = False
        self.poll()

    def close(self) -> None:
        """Stop listening for SIGHUP and polling."""
        for h in self._handles:
            if not h.closed:
                h.close()
        self._handles = []


# -- the command line -----------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--reload-interval`` (SIGHUP needs no flag)."""
    parser.add_argument("--reload-interval", type=_cli.positive_float, default=None, metavar="SECONDS",
                        help="also reload the certificate, key, --sni and --client-ca files when their "
                             "content changes, checked every SECONDS (SIGHUP always reloads)")


def files_from_args(args: argparse.Namespace) -> CertificateFiles:
    """The files named by ``--cert/--key``, ``--sni`` and ``--client-ca``."""
    return CertificateFiles(cert=args.cert, key=args.key,
                            sni=tuple((name, cert, key) for name, cert, key in args.sni),
                            client_ca=args.client_ca)


__all__ = ["CertificateFiles", "Reloader", "Snapshot", "add_arguments", "files_from_args"]
