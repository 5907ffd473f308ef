"""The service manager's notify protocol, spoken by the daemon itself when `NOTIFY_SOCKET` is set.

A systemd service of `Type=notify` learns that the daemon listens from `READY=1`, that its loop
is alive from `WATCHDOG=1` pings, and that it is shutting down from `STOPPING=1`. Each message
is one datagram of `KEY=VALUE` lines sent to the unix socket `NOTIFY_SOCKET` names: a path, or
an abstract socket name written with a leading `@` (`sd_notify(3)`). Without the variable
nothing is sent.

The watchdog is on when the service manager sets `WATCHDOG_USEC` (and `WATCHDOG_PID`, if set,
is this process): pings then go out at most every quarter of that time, well inside the half
`sd_watchdog_enabled(3)` asks for. They are sent from the daemon's own loop (every poll and
every round phase), never from a thread of their own, so a daemon whose loop hangs stops
pinging and is restarted. A failed send is logged once and otherwise ignored: a daemon does not
stop because its supervisor is gone.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping

from m3tgossip.log import get_logger

log = get_logger(__name__)

#: pings go out at most this fraction of the watchdog timeout apart
PING_FRACTION = 0.25


def socket_address(value: str) -> str | None:
    """The `AF_UNIX` address of a `NOTIFY_SOCKET` value: a path, or `@name` for an abstract
    socket (leading NUL); None for what this daemon cannot speak to (e.g. `vsock:`)."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


class Notifier:
    """Sends notify messages to `address` (None: sends nothing).

    `watchdog_s` is the service manager's watchdog timeout; None turns the pings off.
    """

    def __init__(
        self,
        address: str | None,
        watchdog_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address = address
        self.watchdog_s = watchdog_s
        #: seconds between watchdog pings (None: no pings)
        self.interval = None if watchdog_s is None else watchdog_s * PING_FRACTION
        self.clock = clock
        self._last_ping = float("-inf")
        self._sock: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """The notifier the environment asks for (`NOTIFY_SOCKET`, `WATCHDOG_USEC`,
        `WATCHDOG_PID`); a value it cannot use is logged and ignored."""
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET", "")
        address = socket_address(raw) if raw else None
        if raw and address is None:
            log.warning("NOTIFY_SOCKET=%r: not a unix socket path or @name; not notifying", raw)
        watchdog_s = None
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if usec and (not pid or pid == str(os.getpid())):
            try:
                watchdog_s = int(usec) / 1e6 if int(usec) > 0 else None
            except ValueError:
                log.warning("WATCHDOG_USEC=%r: not a number of microseconds; no pings", usec)
        return cls(address, watchdog_s)

    @property
    def active(self) -> bool:
        return self.address is not None and not self._failed

    def send(self, *fields: str) -> bool:
        """Send one message of `KEY=VALUE` fields; False if it was not sent."""
        address = self.address
        if address is None or self._failed:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.sendto("\n".join(fields).encode("utf-8"), address)
        except OSError as exc:
            log.warning("notify socket %r: %s; not notifying any more", self.address, exc)
            self._failed = True
            self.close()
            return False
        return True

    def ready(self, status: str = "") -> None:
        """`READY=1`: the daemon listens."""
        self.send("READY=1", *([f"STATUS={status}"] if status else []))
        self._last_ping = self.clock()

    def watchdog(self, status: str = "") -> None:
        """`WATCHDOG=1`, if the watchdog is on and the last ping is `interval` old."""
        if self.interval is None or not self.active:
            return
        now = self.clock()
        if now - self._last_ping < self.interval:
            return
        self._last_ping = now
        self.send("WATCHDOG=1", *([f"STATUS={status}"] if status else []))

    def stopping(self, status: str = "") -> None:
        """`STOPPING=1`: the daemon is shutting down."""
        self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
