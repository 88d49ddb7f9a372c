"""SharedTier: the optional second cache tier on Redis / Valkey, shared by every sidecar of a deployment (I/O).

The in-process tier stays in front: a request looks there first, and only its misses (under `consistency: strict`,
its hits too) wait for `lookup`, which fetches the shared entry and its generations in one MGET and, on a hit,
puts the entry into the in-process tier, so that the request, dispatched again, is answered from there. What a
sidecar reads from PostgreSQL is stored in both (`fill`), stamped with the generations read before the query went
upstream. Writers `bump` the generations of what they wrote before their commit is acknowledged to their client.
The rule that makes this exact, and the key layout, are in cache/generations.py.

Faults: every call is bounded by `timeout`; a failure opens a circuit breaker for `cooldown`, during which the
sidecar works with its in-process tier alone (and `strict` degrades to `bounded`). Bumps that could not be made are
owed: a probe, after the cooldown, first makes them (fresh values), and only then is the tier used again. What
stays open is a partition: a sidecar that cannot reach the tier while others can; their reads of what it wrote
meanwhile are then protected only by the invalidation bus (as `bounded` is).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cacheproxy.cache.entry import WHOLE_DATABASE, Entry, TableId
from cacheproxy.cache.generations import (
    Namespace,
    Outcome,
    SharedEntry,
    dependency_names,
    encode_entry,
    judge,
    new_generation,
)
from cacheproxy.cache.tier import CacheTier
from cacheproxy.config import SharedCacheConfig

log = logging.getLogger("cacheproxy.shared")

_T = TypeVar("_T")
_MAX_REMEMBERED = 100_000  # fill stamps and strict-mode stamps kept (oldest forgotten: a forgotten one only misses)
_CONNECT_BUDGET = 5.0  # seconds for the first connections at start
_WARM_CONNECTIONS = 4  # opened at start (concurrent calls each take a connection of the pool)
# Failed lookups or fills in a row that open the breaker: one late reply (an event loop busy with a burst of analysis
# can time out a fast tier) is not an outage. A failed bump opens it at once: its owed value must be made first.
_FAILURES_TO_OPEN = 3
_LOCK_POLL = 0.01  # seconds between looks while another sidecar fills the same key
# Call latency histogram buckets (seconds): a round trip on a LAN is ~0.1-1 ms.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass(slots=True)
class SharedCounters:
    """What the tier did since start (exported as cacheproxy_shared_*)."""

    hits: int = 0
    misses: int = 0
    stale: int = 0  # misses that found an entry filled under other generations
    validated: int = 0  # strict: in-process hits confirmed current
    errors: int = 0
    fills: int = 0
    bumps: int = 0
    breaker_opened: int = 0
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0

    def observe(self, seconds: float) -> None:
        index = 0
        while index < len(LATENCY_BUCKETS) and seconds > LATENCY_BUCKETS[index]:
            index += 1
        self.latency_counts[index] += 1
        self.latency_sum += seconds


@dataclass(frozen=True, slots=True)
class Stamp:
    """The generations of an entry's dependencies, read before its query went upstream."""

    namespace: Namespace
    names: tuple[str, ...]
    generations: tuple[bytes, ...]


class SharedTier:
    """The shared tier of one proxy process (see the module docstring)."""

    def __init__(self, config: SharedCacheConfig, local: CacheTier, clock: Callable[[], float]) -> None:
        assert config.url is not None
        self.config = config
        self.strict = config.consistency == "strict"
        self.counters = SharedCounters()
        self._local = local
        self._clock = clock
        self._timeout = config.timeout
        self._client: Any = None
        self._system_id: str | None = config.namespace
        self._namespaces: dict[str, Namespace] = {}
        # key -> the generations its last lookup read (taken by the Fill of the query that goes upstream next).
        self._pending: OrderedDict[Hashable, Stamp] = OrderedDict()
        # strict: key -> the generations its in-process entry is known to be current for.
        self._stamps: OrderedDict[Hashable, tuple[bytes, ...]] = OrderedDict()
        self._open_until: float | None = None  # the breaker: open until then (None: closed)
        self._failures = 0  # calls failed in a row
        self._probe: asyncio.Task[None] | None = None
        self._owed: dict[bytes, bytes] = {}  # generation key -> value: bumps not made while the tier was away
        self._tasks: set[asyncio.Task[Any]] = set()
        self._storing = 0  # fills sent and not yet answered (stats: a sidecar's reads may miss what these hold)
        self.last_error: str | None = None

    # -- life -------------------------------------------------------------------------------------------------

    async def start(self, read_system_id: Callable[[], Awaitable[str]]) -> None:
        """Connect (lazily: the client connects at its first call) and learn the namespace."""
        import redis.asyncio as aioredis  # only when the tier is configured: the dependency is an optional extra

        url = self.config.url or ""
        for alias, scheme in (("valkeys://", "rediss://"), ("valkey://", "redis://")):
            if url.startswith(alias):
                url = scheme + url[len(alias) :]
        options: dict[str, Any] = {"socket_timeout": self._timeout, "socket_connect_timeout": self._timeout}
        if self.config.cluster:
            self._client = aioredis.RedisCluster.from_url(url, **options)
        else:
            self._client = aioredis.Redis.from_url(url, **options)
        if self._system_id is None:
            try:
                self._system_id = await read_system_id()
            except Exception as exc:  # the shared tier is an optimization: the proxy runs without it
                log.warning("shared tier off: cannot read the cluster's system identifier (%s); set "
                            "cache.shared.namespace", exc)  # fmt: skip
                return
        log.info("shared tier %s (%s, namespace %s)", _masked(url), self.config.consistency, self._system_id)
        # A first connection now (TLS and AUTH take longer than a call's timeout): a fresh sidecar's first reads
        # then hit. A tier that is away is only a warning: the breaker opens, and a probe retries later.
        try:
            async with asyncio.timeout(_CONNECT_BUDGET):
                await asyncio.gather(*(self._client.ping() for _ in range(_WARM_CONNECTIONS)))
        except Exception as exc:
            self._failed(exc)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            with contextlib.suppress(Exception):  # closing a connection to a tier that is gone
                await self._client.aclose()

    def use_tier(self, local: CacheTier) -> None:
        """Fill `local` instead (a worker's engine replaces the service's before it starts)."""
        self._local = local

    @property
    def available(self) -> bool:
        """The tier may be used now: started, and its breaker closed (a cooldown that ended starts a probe)."""
        if self._system_id is None or self._client is None:
            return False
        if self._open_until is None:
            return True
        if self._clock() >= self._open_until and self._probe is None:
            self._probe = self._spawn(self._recover())
        return False

    @property
    def in_use(self) -> bool:
        """Like `available`, without side effects (for metrics and stats, which may run on another thread)."""
        return self._system_id is not None and self._client is not None and self._open_until is None

    def namespace(self, database: str) -> Namespace:
        found = self._namespaces.get(database)
        if found is None:
            assert self._system_id is not None
            found = self._namespaces[database] = Namespace(self._system_id, database)
        return found

    # -- reads ------------------------------------------------------------------------------------------------

    def lookup(
        self, database: str, key: Hashable, tables: frozenset[TableId], *, local: bool
    ) -> asyncio.Task[Entry | None] | None:
        """After an in-process miss (or, strict, before serving an in-process hit: `local`): a task whose result is
        the in-process entry of `key` that may be served now (None: none). None: the tier is away."""
        if not self.available:
            return None
        return self._spawn(self._lookup(self.namespace(database), key, tables, local))

    def verified(self, entry: Entry, task: asyncio.Task[Entry | None] | None) -> bool:
        """Strict: whether the in-process `entry` may be served: it is the very entry its lookup (`task`) confirmed
        (not one another session put since), or the tier is away."""
        if task is None:
            return not self.available
        return task.done() and not task.cancelled() and task.exception() is None and task.result() is entry

    async def _lookup(self, ns: Namespace, key: Hashable, tables: frozenset[TableId], local: bool) -> Entry | None:
        names = dependency_names(tables)
        entry_key = ns.entry_key(key)
        generation_keys = [ns.generation_key(name) for name in names]
        local_generations = self._local.generations(tables)  # guards the in-process put against a bus invalidation
        reply = await self._call(lambda: self._client.mget([entry_key, *generation_keys]))
        if reply is None:
            return None
        current = reply[1:]
        if local and None not in current and self._stamps.get(key) == tuple(current):
            # (the stamp is that of the in-process entry now: every in-process put of `key` sets or drops it)
            held = self._local.get(key, self._clock(), count_miss=False, count_hit=False)
            if held is not None:
                self.counters.validated += 1
                return held
        outcome, found = judge(reply[0], names, current, time.time())
        if outcome is Outcome.HIT and found is not None:
            held = self._put_local(key, tables, found, local_generations)
            if held is not None:
                self.counters.hits += 1
                return held
        self._stamps.pop(key, None)
        self.counters.misses += 1
        if outcome is Outcome.STALE:
            self.counters.stale += 1
        if outcome is Outcome.CHANGED:
            created = await self._create_generations(generation_keys, current, ns.lock_key(key))
            if created is None:
                return None
            current = created
        elif self.config.lock_wait > 0:
            found = await self._wait_for_other_fill(ns, key, entry_key, generation_keys, names)
            held = self._put_local(key, tables, found, local_generations) if found is not None else None
            if held is not None:
                self.counters.hits += 1
                return held
        self._remember(self._pending, key, Stamp(ns, names, tuple(current)))
        return None

    async def _create_generations(
        self, keys: list[bytes], current: list[bytes | None], lock: bytes
    ) -> list[bytes] | None:
        """Missing generation keys get a fresh value (unless another sidecar made one first): a fill needs them.
        The fill lock is taken in the same round trip (a first read of a key is where stampedes happen)."""

        async def create() -> list[bytes | None]:
            pipe = self._client.pipeline(transaction=False)
            if self.config.lock_wait > 0:
                pipe.set(lock, b"1", nx=True, px=max(1, int(self.config.lock_wait * 1000)))
            for key, value in zip(keys, current, strict=True):
                if value is None:
                    pipe.set(key, new_generation(secrets.randbits(63)), nx=True)
            for key in keys:  # (GETs, not an MGET: a cluster pipeline refuses multi-key commands)
                pipe.get(key)
            replies: list[Any] = await pipe.execute()
            return list(replies[-len(keys) :])

        values = await self._call(create)
        if values is None or any(value is None for value in values):
            return None
        return values  # type: ignore[return-value]

    async def _wait_for_other_fill(
        self, ns: Namespace, key: Hashable, entry_key: bytes, generation_keys: list[bytes], names: tuple[str, ...]
    ) -> SharedEntry | None:
        """Single flight across sidecars: take the key's short lock, or wait (up to lock_wait) for its holder's
        fill. The lock expires by itself: a holder that never fills (an error, a result too big) costs one wait."""
        wait = self.config.lock_wait
        lock_ms = max(1, int(wait * 1000))

        async def take() -> bool:
            return bool(await self._client.set(ns.lock_key(key), b"1", nx=True, px=lock_ms))

        taken = await self._call(take)
        if taken is None or taken:
            return None  # (the tier failed, or this sidecar fills it)
        deadline = self._clock() + wait
        while self._clock() < deadline:
            await asyncio.sleep(_LOCK_POLL)
            reply = await self._call(lambda: self._client.mget([entry_key, *generation_keys]))
            if reply is None:
                return None
            outcome, found = judge(reply[0], names, reply[1:], time.time())
            if outcome is Outcome.HIT:
                return found
            if outcome is Outcome.CHANGED:
                return None
        return None

    def _put_local(
        self, key: Hashable, tables: frozenset[TableId], found: SharedEntry, local_generations: tuple[int, ...]
    ) -> Entry | None:
        """A shared hit into the in-process tier, stamped; the entry put, or None (refused: a bus invalidation
        since the lookup began, or too big)."""
        ttl = found.expires_at - time.time()
        now = self._clock()
        if not self._local.put(key, found.value, tables=tables, ttl=ttl, now=now, query=found.query, rule=found.rule,
                               generations=local_generations):  # fmt: skip
            return None
        self._remember(self._stamps, key, found.generations)
        return self._local.get(key, now, count_miss=False, count_hit=False)

    # -- writes -----------------------------------------------------------------------------------------------

    def take(self, key: Hashable) -> Stamp | None:
        """The generations a lookup of `key` read, for the query that now goes upstream (taken once). Whichever
        lookup read them, it was before this moment, hence before the query: an entry stamped with them is never
        newer than its stamp (older is harmless: it only misses)."""
        return self._pending.pop(key, None)

    def fill(self, key: Hashable, value: bytes, tables: frozenset[TableId], ttl: float, query: str,
             rule: str | None, stamp: object) -> None:  # fmt: skip
        """A result read from PostgreSQL was stored in process (called for every such store): store it here too,
        stamped with `stamp` (`take`). Without one, the in-process entry has no stamp (strict: not served unchecked).
        """
        if not isinstance(stamp, Stamp) or not self.available:
            self._stamps.pop(key, None)
            return
        ns, names, generations = stamp.namespace, stamp.names, stamp.generations
        if names != dependency_names(tables):
            self._stamps.pop(key, None)
            return  # its dependencies were judged differently (a catalog change meanwhile): not worth the risk
        self._remember(self._stamps, key, generations)
        entry = SharedEntry(value, names, generations, time.time() + ttl, query, rule)
        blob = encode_entry(entry, self.config.compress_above)
        ttl_ms = max(1, int(ttl * 1000))

        async def store() -> None:
            pipe = self._client.pipeline(transaction=False)
            pipe.set(ns.entry_key(key), blob, px=ttl_ms)
            pipe.delete(ns.lock_key(key))
            await pipe.execute()

        self.counters.fills += 1
        self._storing += 1
        self._spawn(self._call(store)).add_done_callback(self._stored)

    def _stored(self, _task: asyncio.Task[Any]) -> None:
        self._storing -= 1

    def bump(
        self, database: str, names: Iterable[str], *, everything: bool = False, read: Iterable[str] = ()
    ) -> asyncio.Task[dict[str, bytes | None] | None] | None:
        """Writes to `names` of `database` (or, `everything`, to anything in it) are about to be acknowledged: give
        their generations fresh values. The task to wait for before acknowledging; None when the tier is away (the
        bumps are owed: made before the tier is used again). In the same round trip, after the bumps, the current
        generations of `read` (the task's result: for write-through refreshes sent once it is done; None when the
        call failed)."""
        ns = self.namespace(database) if self._system_id is not None else None
        if ns is None:
            return None
        targets = {ns.generation_key(name) for name in names}
        if everything:
            targets.add(ns.generation_key(WHOLE_DATABASE))
        if not targets:
            return None
        values = {target: new_generation(secrets.randbits(63)) for target in targets}
        if not self.available:
            self._owed.update(values)
            return None
        self.counters.bumps += 1
        wanted = sorted(set(read))

        async def bump_and_read() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for target, value in values.items():  # (SETs, not an MSET: a cluster pipeline refuses multi-key ones)
                pipe.set(target, value)
            for name in wanted:
                pipe.get(ns.generation_key(name))
            replies: list[Any] = await pipe.execute()
            return replies

        async def bump() -> dict[str, bytes | None] | None:
            replies = await self._call(bump_and_read, opens=True)
            if replies is None:
                self._owed.update(values)
                return None
            return dict(zip(wanted, replies[len(values) :], strict=True))

        return self._spawn(bump())

    def stamp(self, database: str, tables: frozenset[TableId], generations: dict[str, bytes | None]) -> Stamp | None:
        """The stamp of a query sent after `generations` were read (by `bump`), or None if one is missing."""
        names = dependency_names(tables)
        values = [generations.get(name) for name in names]
        if self._system_id is None or any(value is None for value in values):
            return None
        return Stamp(self.namespace(database), names, tuple(v for v in values if v is not None))

    # -- faults -----------------------------------------------------------------------------------------------

    async def _call(self, make: Callable[[], Awaitable[_T]], *, opens: bool = False) -> _T | None:
        """One bounded call; None on any failure, which opens the breaker when `opens` or after a few in a row."""
        started = self._clock()
        try:
            async with asyncio.timeout(self._timeout):
                result = await make()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # redis errors, OSError, TimeoutError, TLS errors: all mean "the tier is away"
            self._failed(exc, opens=opens)
            return None
        self._failures = 0
        self.counters.observe(self._clock() - started)
        return result

    def _failed(self, exc: BaseException, *, opens: bool = True) -> None:
        self.counters.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        self._failures += 1
        if not opens and self._failures < _FAILURES_TO_OPEN:
            log.info("shared tier call failed (%s)", self.last_error)
            return
        if self._open_until is None:
            self.counters.breaker_opened += 1
            log.warning("shared tier unavailable (%s): going on with the in-process tier alone for %.1fs",
                        self.last_error, self.config.cooldown)  # fmt: skip
        self._open_until = self._clock() + self.config.cooldown

    async def _recover(self) -> None:
        """After a cooldown: one probe, which first makes the bumps owed; the tier is used again only then."""
        try:
            owed = dict(self._owed)
            ok = await self._call(lambda: self._client.ping(), opens=True)
            if ok is not None and owed:
                fresh = {key: new_generation(secrets.randbits(63)) for key in owed}
                ok = await self._call(lambda: self._client.mset(fresh), opens=True)
            if ok is None:
                return  # (_call reopened the breaker)
            for key in owed:
                self._owed.pop(key, None)
            self._open_until = None
            log.warning("shared tier back (%d owed generation bumps made)", len(owed))
        finally:
            self._probe = None

    # -- helpers ----------------------------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @staticmethod
    def _remember(table: OrderedDict[Hashable, Any], key: Hashable, value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        if len(table) > _MAX_REMEMBERED:
            table.popitem(last=False)

    def stats(self) -> dict[str, object]:
        """For SHOW STATS and /stats."""
        c = self.counters
        lookups = c.hits + c.misses
        return {
            "url": _masked(self.config.url or ""),
            "consistency": self.config.consistency,
            "available": self.in_use,
            "namespace": self._system_id,
            "hits": c.hits,
            "misses": c.misses,
            "stale": c.stale,
            "validated": c.validated,
            "hit_ratio": c.hits / lookups if lookups else None,
            "errors": c.errors,
            "fills": c.fills,
            "fills_in_flight": self._storing,
            "bumps": c.bumps,
            "owed_bumps": len(self._owed),
            "breaker_opened": c.breaker_opened,
            "last_error": self.last_error,
        }


def _masked(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{host}" if ":" in userinfo else url
