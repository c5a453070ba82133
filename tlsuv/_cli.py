"""What the command-line tools share: one-line errors, exit code 2, logging set-up, the PROXY flags."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from typing import NoReturn

from ._sockopt import KEEPALIVE_MAX
from .connection import ConnectionOptions
from .proxy import DEFAULT_TIMEOUT, LOOPBACK, IPNetwork, ProxyOptions, parse_networks

# The conventional exit code for "you called me wrong" (argparse, BSD sysexits' EX_USAGE is 64
# but shells and argparse users expect 2).
EXIT_USAGE = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (no usage dump) and exit 2."""

    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog}: error: {message} (see --help)")


def program_name(script: str, module: str) -> str:
    """The name usage and error lines show: how the user started the tool.

    ``script`` when started by that console script (``tlsuv-echo``), else the
    ``python -m`` form -- also when ``main()`` is called from Python.
    """
    return script if os.path.basename(sys.argv[0]) == script else f"python -m {module}"


def fail(message: str) -> NoReturn:
    print(message, file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):  # also rejects NaN, which compares false
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535: {text!r}")
    return value


def seconds_or_off(text: str) -> float | None:
    """A positive number of seconds, or ``off`` (None)."""
    return None if text == "off" else positive_float(text)


def keepalive_seconds(text: str) -> int | None:
    """Whole seconds 1-32767 (TCP keepalive's unit and limit), or ``off`` (None)."""
    if text == "off":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not whole seconds or 'off': {text!r}") from None
    if not 1 <= value <= KEEPALIVE_MAX:
        raise argparse.ArgumentTypeError(f"must be 1-{KEEPALIVE_MAX} seconds or 'off': {text!r}")
    return value


def add_dead_peer_arguments(parser: argparse.ArgumentParser) -> None:
    """``--keepalive`` and ``--send-timeout``: how a peer that vanished is found (tlsuv._sockopt)."""
    defaults = ConnectionOptions()
    parser.add_argument("--keepalive", type=keepalive_seconds, default=defaults.keepalive,
                        metavar="SECONDS|off",
                        help=f"probe a peer silent this long with TCP keepalive; one that answers "
                             f"nothing is dropped (default {defaults.keepalive})")
    parser.add_argument("--send-timeout", type=seconds_or_off, default=defaults.send_timeout,
                        metavar="SECONDS|off",
                        help=f"drop a connection whose queued data makes no progress this long "
                             f"(default {defaults.send_timeout:g})")


LOG_LEVELS = ("debug", "info", "warning", "error")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# -- PROXY protocol (tlsuv.proxy) ------------------------------------------------


def _networks(text: str) -> tuple[IPNetwork, ...]:
    try:
        return parse_networks(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_proxy_arguments(parser: argparse.ArgumentParser) -> None:
    """``--proxy-protocol``, ``--proxy-from`` and ``--proxy-timeout``."""
    g = parser.add_argument_group("behind a load balancer")
    g.add_argument("--proxy-protocol", action="store_true",
                   help="every connection starts with a PROXY protocol v1/v2 header (behind HAProxy "
                        "or another L4 balancer); the handler sees the client's address")
    g.add_argument("--proxy-from", type=_networks, default=None, metavar="CIDR[,CIDR]",
                   help="balancers allowed to send the header (default 127.0.0.0/8,::1); "
                        "others are refused")
    g.add_argument("--proxy-timeout", type=positive_float, default=None, metavar="SECONDS",
                   help=f"drop a connection whose header is not complete by then "
                        f"(default {DEFAULT_TIMEOUT:g})")


def proxy_options(args: argparse.Namespace, prog: str) -> ProxyOptions | None:
    """The :class:`ProxyOptions` the flags ask for (None without ``--proxy-protocol``)."""
    if not args.proxy_protocol:
        for flag, value in (("--proxy-from", args.proxy_from), ("--proxy-timeout", args.proxy_timeout)):
            if value is not None:
                fail(f"{prog}: error: {flag} needs --proxy-protocol")
        return None
    return ProxyOptions(
        allow_from=args.proxy_from if args.proxy_from is not None else LOOPBACK,
        timeout=args.proxy_timeout if args.proxy_timeout is not None else DEFAULT_TIMEOUT,
    )


# -- observability (tlsuv.metrics, tlsuv.accesslog) --------------------------------


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` (``:PORT`` alone: loopback), numeric hosts only.  Raises ValueError."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ValueError(f"expected HOST:PORT: {text!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    host = host or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"not a port number: {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0-65535: {port_text!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"not a numeric IP address: {host!r}") from None
    return host, port


def _address_argument(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_observability_arguments(parser: argparse.ArgumentParser) -> None:
    """``--metrics`` and ``--access-log``."""
    g = parser.add_argument_group("observability")
    g.add_argument("--metrics", type=_address_argument, default=None, metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics, and /-/healthy, /-/ready, "
                        "/healthz (plain HTTP: keep it on loopback or a private network; port 0 picks one)")
    g.add_argument("--access-log", default=None, metavar="FILE",
                   help="append one JSON line per connection to FILE when it ends (-: stderr); "
                        "SIGUSR1 reopens it")
