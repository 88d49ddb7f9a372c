"""Connections to the upstream PostgreSQL: TCP, the sslmode negotiation, and out-of-band cancel requests."""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import replace

import asyncpg

from cacheproxy.config import UpstreamConfig
from cacheproxy.errors import CONNECTION_FAILURE, UpstreamError
from cacheproxy.protocol.startup import encode_cancel, encode_ssl_request

log = logging.getLogger("cacheproxy.upstream")

# Large enough that a busy result streams in few reads; the StreamReader's own buffer limit is twice this.
READ_LIMIT = 256 * 1024

# The host that connections to a multi-host upstream go to now, by its host list: chosen (and changed at a
# failover) by cacheproxy/upstream_hosts.py; a plain dict, so that every connection, wherever it is opened (sessions,
# feeds, snapshots), follows the one choice without being handed an object.
_chosen: dict[tuple[tuple[str, int], ...], tuple[str, int]] = {}


def upstream_address(cfg: UpstreamConfig) -> tuple[str, int]:
    """Where a new connection to `cfg` goes: the host chosen for it, else its first one."""
    return _chosen.get(cfg.hosts, (cfg.host, cfg.port))


def choose_address(cfg: UpstreamConfig, address: tuple[str, int]) -> None:
    _chosen[cfg.hosts] = address


async def open_upstream(
    cfg: UpstreamConfig, address: tuple[str, int] | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a connection to the upstream (`address`, else the chosen host), negotiated to TLS as `cfg.sslmode` asks
    (libpq's semantics).

    `allow` is treated as `disable`: libpq retries with TLS only after a plaintext attempt fails, and a proxy cannot
    replay an authentication exchange that the client already took part in.
    """
    host, port = address or upstream_address(cfg)
    if (host, port) != (cfg.host, cfg.port):
        cfg = replace(cfg, host=host, port=port)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(cfg.host, cfg.port, limit=READ_LIMIT), timeout=cfg.connect_timeout
        )
    except TimeoutError as exc:
        raise UpstreamError(
            f"could not connect to upstream server {cfg.host}:{cfg.port}: timeout after {cfg.connect_timeout:g}s"
        ) from exc
    except OSError as exc:
        raise UpstreamError(
            f"could not connect to upstream server {cfg.host}:{cfg.port}: {exc.strerror or exc}"
        ) from exc
    if cfg.sslmode in ("disable", "allow"):
        return reader, writer
    try:
        await _negotiate_tls(cfg, reader, writer)
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def _negotiate_tls(cfg: UpstreamConfig, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(encode_ssl_request())
    try:
        answer = await asyncio.wait_for(reader.readexactly(1), timeout=cfg.connect_timeout)
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
        raise UpstreamError(f"upstream server {cfg.host}:{cfg.port} failed during SSL negotiation") from exc
    if answer == b"N":
        if cfg.sslmode == "prefer":
            return
        raise UpstreamError(f"upstream server {cfg.host}:{cfg.port} does not support SSL, but SSL was required")
    if answer != b"S":
        raise UpstreamError(f"upstream server {cfg.host}:{cfg.port} sent an invalid response to SSL negotiation")
    context = client_ssl_context(cfg)
    hostname = cfg.host if cfg.sslmode == "verify-full" else None
    try:
        await writer.start_tls(context, server_hostname=hostname)
    except (ssl.SSLError, OSError) as exc:
        raise UpstreamError(f"SSL connection to upstream server {cfg.host}:{cfg.port} failed: {exc}") from exc


def client_ssl_context(cfg: UpstreamConfig) -> ssl.SSLContext:
    """The TLS context for `cfg.sslmode`. As in libpq, `require` with a root certificate verifies the chain."""
    verify = cfg.sslmode in ("verify-ca", "verify-full") or (cfg.sslmode == "require" and bool(cfg.sslrootcert))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if verify:
        if cfg.sslrootcert:
            context.load_verify_locations(cafile=cfg.sslrootcert)
        else:
            context.load_default_certs()
        context.check_hostname = cfg.sslmode == "verify-full"
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cfg.sslcert:
        context.load_cert_chain(cfg.sslcert, cfg.sslkey)
    return context


async def control_connection(
    cfg: UpstreamConfig, database: str, purpose: str, address: tuple[str, int] | None = None
) -> asyncpg.Connection:
    """The proxy's own asyncpg connection (catalog reads, snapshot evidence), as the upstream URL's user, with the
    same sslmode as client sessions; `purpose` shows in pg_stat_activity as application_name cacheproxy-<purpose>.
    It goes to `address`, else to the chosen host."""
    host, port = address or upstream_address(cfg)
    if (host, port) != (cfg.host, cfg.port):
        cfg = replace(cfg, host=host, port=port)
    ssl_arg: ssl.SSLContext | str | bool = False
    if cfg.sslmode == "prefer":
        ssl_arg = "prefer"
    elif cfg.sslmode not in ("disable", "allow"):
        ssl_arg = client_ssl_context(cfg)
    return await asyncpg.connect(
        host=cfg.host,
        port=cfg.port,
        user=cfg.user,
        password=cfg.password,
        database=database,
        ssl=ssl_arg,
        timeout=cfg.connect_timeout,
        statement_cache_size=0,
        server_settings={"application_name": f"cacheproxy-{purpose}"},
    )


async def send_cancel(cfg: UpstreamConfig, process_id: int, secret_key: bytes) -> None:
    """Deliver a CancelRequest for an upstream backend. Best effort, as in libpq: no reply is expected."""
    try:
        reader, writer = await open_upstream(cfg)
    except UpstreamError as exc:
        log.warning("cancel request not delivered: %s", exc.message)
        return
    try:
        writer.write(encode_cancel(process_id, secret_key))
        await writer.drain()
        # The server closes the connection once it has read the request; wait for that, briefly.
        await asyncio.wait_for(reader.read(1), timeout=cfg.connect_timeout)
    except (OSError, TimeoutError) as exc:
        log.warning("cancel request to upstream backend %d may not have been delivered: %s", process_id, exc)
    finally:
        writer.close()


def connection_lost_error() -> UpstreamError:
    return UpstreamError("lost connection to the upstream server", sqlstate=CONNECTION_FAILURE)
