"""Which upstream host connections go to, and failover detection: libpq's multi-host rules, probed by the proxy.

A multi-host URL (`postgres://db1:5432,db2:5432/app?target_session_attrs=read-write`) names candidate servers. As
libpq does (libpq-connect, "Specifying Multiple Hosts" and target_session_attrs), the hosts are tried in order, or
in random order with `load_balance_hosts=random`, and the first whose session passes the test for
target_session_attrs is chosen:

- any: the first host that accepts a connection;
- read-write / read-only: `SHOW transaction_read_only` is off / on (libpq reads in_hot_standby and
  default_transaction_read_only from ParameterStatus on PostgreSQL 14+ instead, which says the same);
- primary / standby: `pg_is_in_recovery()` is false / true;
- prefer-standby: a standby if any host is one, else any host.

The proxy relays its clients' authentication, so it cannot try a client's session on one host after another: it
probes the hosts with its own connections (the URL's user, as its catalog reads do), and every connection it opens
(client sessions, invalidation feeds, snapshots) goes to the chosen host (cacheproxy.upstream.upstream_address).

A probe also reads the server's identity: its system identifier and WAL timeline. A failover is noticed when the
chosen server changes: another host chosen (the old primary gone, or another host now the one that answers
read-write), another system identifier, or a new timeline (a promoted standby, even behind the same address). It is
logged once with what was seen, counted in cacheproxy_upstream_failovers_total, and reported to the listeners
(App: the cache is dropped and the feeds reattach, see cacheproxy/proxy/reattach.py for the sessions).

When probes run: at start, whenever a connection to the upstream is lost (`suspect`), and, for a multi-host URL,
every `failover.check_interval` (a standby promoted while the old primary still runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import asyncpg
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from cacheproxy.config import FailoverConfig, UpstreamConfig
from cacheproxy.upstream import choose_address, control_connection, upstream_address

log = logging.getLogger("cacheproxy.failover")

# What a probe reads (one round trip). The timeline of a primary is the one it writes WAL on now (the first eight
# hex digits of its current WAL file name); a standby's is its last checkpoint's. PostgreSQL 15 lets any role call
# these; where a server restricts them, the role test alone runs (identity unknown: only a change of host is then
# seen as a failover).
_PROBE = """
SELECT pg_is_in_recovery(), current_setting('transaction_read_only') = 'on',
       (SELECT system_identifier::text FROM pg_control_system()),
       CASE WHEN pg_is_in_recovery() THEN (SELECT timeline_id FROM pg_control_checkpoint())
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END
"""
_PROBE_ROLE_ONLY = "SELECT pg_is_in_recovery(), current_setting('transaction_read_only') = 'on', NULL, NULL"
_PROBE_TIMEOUT = 5.0
_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError, ssl.SSLError)


@dataclass(frozen=True, slots=True)
class HostState:
    """What one probe of one host saw."""

    host: str
    port: int
    in_recovery: bool
    read_only: bool
    system_identifier: str | None
    timeline: int | None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def describe(self) -> str:
        role = "standby" if self.in_recovery else ("read-only primary" if self.read_only else "primary")
        where = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        identity = f"system {self.system_identifier or '?'}, timeline {self.timeline or '?'}"
        return f"{where} ({role}, {identity})"


# -- the rules (sans-IO) ------------------------------------------------------------------------------------------


def passes(state: HostState, target: str) -> bool:
    """Whether a host's session passes libpq's test for target_session_attrs (prefer-standby: see `choose`)."""
    if target == "read-write":
        return not state.read_only
    if target == "read-only":
        return state.read_only
    if target == "primary":
        return not state.in_recovery
    if target == "standby":
        return state.in_recovery
    return True  # any, prefer-standby


def choose(states: Sequence[HostState], target: str) -> HostState | None:
    """The host to use among those that answered, in the order they were tried."""
    if target == "prefer-standby":
        standbys = [state for state in states if state.in_recovery]
        return standbys[0] if standbys else (states[0] if states else None)
    return next((state for state in states if passes(state, target)), None)


def try_order(hosts: Sequence[tuple[str, int]], balance: str, rng: random.Random) -> list[tuple[str, int]]:
    """The order hosts are tried in: as written, or shuffled for load_balance_hosts=random."""
    order = list(hosts)
    if balance == "random":
        rng.shuffle(order)
    return order


def failover_reason(before: HostState | None, after: HostState) -> str | None:
    """Why `after` is another server than `before` (None: the same one, or nothing was known before)."""
    if before is None:
        return None
    if before.address != after.address:
        return f"the upstream moved from {before.describe()} to {after.describe()}"
    if before.system_identifier and after.system_identifier and before.system_identifier != after.system_identifier:
        return f"{after.describe()} is another cluster (system {before.system_identifier} before)"
    if before.timeline and after.timeline and before.timeline != after.timeline:
        return f"{after.describe()} is on a new timeline (timeline {before.timeline} before): it was promoted"
    return None


# -- probing and choosing -----------------------------------------------------------------------------------------

FailoverListener = Callable[[HostState | None, HostState, str], None]


class UpstreamHosts:
    """One proxy's view of its upstream servers: the chosen one, probes, failovers, and the re-login budget."""

    def __init__(self, cfg: UpstreamConfig, failover: FailoverConfig, *, rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.settings = failover
        self.current: HostState | None = None
        self.failovers = 0
        self.last_failover: str | None = None
        self._rng = rng or random.Random()
        self._listeners: list[FailoverListener] = []
        self._resolving: asyncio.Task[HostState | None] | None = None
        self._checking: tuple[float, asyncio.Task[HostState | None]] | None = None
        self._suspect = False
        self._monitor: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        # Sessions logging in again after a loss: at most this many at once (see cacheproxy/proxy/reattach.py).
        self.logins: asyncio.Semaphore | None = None
        self.logins_waiting = 0
        self.logins_max_seen = 0
        self._logins_now = 0

    @property
    def multi_host(self) -> bool:
        return len(self.cfg.hosts) > 1

    @property
    def address(self) -> tuple[str, int]:
        return upstream_address(self.cfg)

    def on_failover(self, listener: FailoverListener) -> None:
        self._listeners.append(listener)

    # -- lifecycle --------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Choose a host before the first client arrives (one that answers; a failure is logged, not fatal). With
        one host there is nothing to choose: it is probed in the background (to know its identity)."""
        self.logins = asyncio.Semaphore(self.settings.reattach_concurrency)
        self._wake = asyncio.Event()
        if self.multi_host:
            chosen = await self.resolve()
            if chosen is None:
                log.warning("no upstream host passes target_session_attrs=%s yet", self.cfg.target_session_attrs)
        else:
            self._suspect = True  # (probed at once by the watch below)
            self._wake.set()
        self._monitor = asyncio.get_running_loop().create_task(self._watch(), name="upstream-hosts")

    async def stop(self) -> None:
        for task in (self._monitor, self._resolving):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):  # stopping: its outcome does not matter
                    await task

    def suspect(self, why: str) -> None:
        """A connection to the chosen host was lost: probe again (once, however many sessions report it)."""
        if not self._suspect:
            log.info("upstream %s: connection lost (%s); probing the upstream hosts", _fmt(self.address), why)
        self._suspect = True
        if self._wake is not None:
            self._wake.set()

    async def _watch(self) -> None:
        assert self._wake is not None
        interval = self.settings.check_interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=interval if self.multi_host else None)
            self._wake.clear()
            try:
                chosen = await self.resolve()
            except Exception:  # a bug must not end the watch
                log.exception("probing the upstream hosts failed")
                chosen = None
            if chosen is None and self._suspect:
                await asyncio.sleep(min(interval, 0.5))  # nothing answers yet: probe again soon
                self._wake.set()

    async def resolve(self) -> HostState | None:
        """Probe the hosts (one probe round at a time, shared by every caller) and choose one; None if none fits."""
        if self._resolving is None or self._resolving.done():
            self._resolving = asyncio.get_running_loop().create_task(self._resolve())
        return await asyncio.shield(self._resolving)

    async def check_current(self, since: float) -> HostState | None:
        """Probe the chosen host with a probe started at or after `since` (time.monotonic()), shared by every caller
        that accepts it: what it is now (None: it does not answer)."""
        if self._checking is None or self._checking[0] < since:
            task = asyncio.get_running_loop().create_task(self._probe(self.address))
            self._checking = (time.monotonic(), task)
        return await asyncio.shield(self._checking[1])

    async def _resolve(self) -> HostState | None:
        target = self.cfg.target_session_attrs
        if self.cfg.load_balance_hosts == "random" and self.current is not None:
            # Balanced: the host chosen stays chosen while it passes (a new draw each probe would look like a
            # failover every time); for libpq, each connection draws, but these probes are not connections.
            state = await self._probe(self.current.address)
            if state is not None and passes(state, target) and (target != "prefer-standby" or state.in_recovery):
                self._suspect = False
                self._chose(state)
                return state
        order = try_order(self.cfg.hosts, self.cfg.load_balance_hosts, self._rng)
        seen: list[HostState] = []
        for address in order:
            state = await self._probe(address)
            if state is None:
                continue
            seen.append(state)
            if target != "prefer-standby" and passes(state, target):
                break  # as libpq: the first that passes, without trying the rest
        chosen = choose(seen, target)
        if chosen is None:
            return None
        self._suspect = False
        self._chose(chosen)
        return chosen

    def _chose(self, chosen: HostState) -> None:
        before = self.current
        self.current = chosen
        choose_address(self.cfg, chosen.address)
        reason = failover_reason(before, chosen)
        if reason is None:
            return
        self.failovers += 1
        self.last_failover = reason
        log.warning("upstream failover: %s; cached results are dropped and sessions re-attach", reason)
        for listener in self._listeners:
            try:
                listener(before, chosen, reason)
            except Exception:
                log.exception("a failover listener failed")

    async def _probe(self, address: tuple[str, int]) -> HostState | None:
        database = self.cfg.database or self.cfg.user or "postgres"
        try:
            async with asyncio.timeout(min(self.cfg.connect_timeout, _PROBE_TIMEOUT) + _PROBE_TIMEOUT):
                conn = await control_connection(self.cfg, database, "probe", address=address)
                try:
                    try:
                        row = await conn.fetchrow(_PROBE)
                    except asyncpg.InsufficientPrivilegeError:
                        row = await conn.fetchrow(_PROBE_ROLE_ONLY)
                finally:
                    await conn.close()
        except _ERRORS as exc:
            log.debug("upstream %s does not answer: %s", _fmt(address), exc)
            return None
        assert row is not None
        return HostState(address[0], address[1], bool(row[0]), bool(row[1]), row[2], row[3])

    # -- the re-login budget ----------------------------------------------------------------------------------------

    async def login_slot(self) -> _LoginSlot:
        """Wait for one of `failover.reattach_concurrency` slots to log a session in again."""
        assert self.logins is not None
        self.logins_waiting += 1
        try:
            await self.logins.acquire()
        finally:
            self.logins_waiting -= 1
        self._logins_now += 1
        self.logins_max_seen = max(self.logins_max_seen, self._logins_now)
        return _LoginSlot(self)

    def _release_login(self) -> None:
        assert self.logins is not None
        self._logins_now -= 1
        self.logins.release()

    async def wait_for_server(self, deadline: float) -> HostState | None:
        """Wait until a host passes (probing as the monitor does) or the deadline (time.monotonic()) passes."""
        delay = 0.05
        while True:
            chosen = None if self._suspect else self.current
            if chosen is None:
                chosen = await self.resolve()
            if chosen is not None:
                return chosen
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 0.5)


class _LoginSlot:
    def __init__(self, hosts: UpstreamHosts) -> None:
        self._hosts = hosts

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self._hosts._release_login()


def _fmt(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class FailoverCollector:
    """cacheproxy_upstream_failovers_total and the re-login gauges, read at scrape time (registered by App on the
    proxy's own Metrics registry)."""

    def __init__(self, hosts: UpstreamHosts) -> None:
        self._hosts = hosts

    def collect(self) -> Iterator[Metric]:
        hosts = self._hosts
        yield CounterMetricFamily(
            "cacheproxy_upstream_failovers", "Failovers of the upstream noticed (another server chosen).",
            value=hosts.failovers,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "cacheproxy_upstream_reattach_waiting", "Sessions waiting to log in again after losing their upstream.",
            value=hosts.logins_waiting,
        )  # fmt: skip
