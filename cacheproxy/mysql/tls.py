"""TLS on the MySQL front end's upstream connections: which context each gets, and when plaintext is refused.

The upstream URL's `sslmode` (and sslrootcert, sslcert, sslkey) mean what they mean for PostgreSQL (libpq's words):
disable and allow stay in plaintext (a proxy cannot retry an exchange the client already took part in), prefer uses
TLS when the server offers CLIENT_SSL, require insists on it (verifying the chain when sslrootcert is given),
verify-ca verifies the chain, verify-full the host name too. The same rules hold for the session connections, the
catalog reads and the binlog feed. The context offered to clients is built as the PostgreSQL front end's is, from the
same tls.* settings.
"""

from __future__ import annotations

import ssl
from typing import Any

from cacheproxy.config import UpstreamConfig
from cacheproxy.mysql.codec import Capability
from cacheproxy.upstream import client_ssl_context

_PLAINTEXT = ("disable", "allow")
_REQUIRED = ("require", "verify-ca", "verify-full")


class UpstreamTLSError(Exception):
    """TLS to the upstream is required and the server does not offer it, or the TLS handshake failed."""


def upstream_context(cfg: UpstreamConfig, server_capabilities: int) -> ssl.SSLContext | None:
    """The context for an upstream connection whose server offered `server_capabilities`; None: plaintext.
    Raises UpstreamTLSError when sslmode requires TLS and the server does not offer it."""
    if cfg.sslmode in _PLAINTEXT:
        return None
    if not server_capabilities & Capability.SSL:
        if cfg.sslmode in _REQUIRED:
            raise UpstreamTLSError(
                f"the MySQL server {cfg.host}:{cfg.port} does not offer TLS, but sslmode={cfg.sslmode} requires it"
            )
        return None
    return client_ssl_context(cfg)


def server_hostname(cfg: UpstreamConfig) -> str | None:
    """The name the upstream certificate must carry (verify-full only, as in libpq)."""
    return cfg.host if cfg.sslmode == "verify-full" else None


def driver_ssl(cfg: UpstreamConfig) -> ssl.SSLContext | None:
    """The `ssl` argument for the proxy's own aiomysql connections (catalog reads). aiomysql uses TLS only when the
    server offers it: `check_driver_tls` refuses the rest."""
    return None if cfg.sslmode in _PLAINTEXT else client_ssl_context(cfg)


def pymysql_ssl(cfg: UpstreamConfig) -> dict[str, Any]:
    """PyMySQL's TLS arguments for `cfg.sslmode` (its own `ssl` means required; with none it prefers TLS, without
    verifying, which is what prefer means)."""
    if cfg.sslmode in _PLAINTEXT:
        return {"ssl_disabled": True}
    if cfg.sslmode == "prefer":
        return {}
    return {"ssl": client_ssl_context(cfg)}


def check_driver_tls(cfg: UpstreamConfig, server_capabilities: int) -> None:
    """Raise UpstreamTLSError when a driver connection went plaintext although sslmode requires TLS."""
    if cfg.sslmode in _REQUIRED and not server_capabilities & Capability.SSL:
        raise UpstreamTLSError(
            f"the MySQL server {cfg.host}:{cfg.port} does not offer TLS, but sslmode={cfg.sslmode} requires it"
        )
