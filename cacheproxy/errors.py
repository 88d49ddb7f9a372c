"""Error types and the SQLSTATE codes that cacheproxy itself reports to clients.

Every error that reaches a client carries a SQLSTATE (PostgreSQL Appendix A, "Error Codes"). Two families, as in
h11: `ProtocolViolation` is a peer that broke the protocol; `UpstreamError` is the real database being unreachable
or lost. Both are `ProxyError`s, which know how to present themselves as an ErrorResponse.
"""

from __future__ import annotations

# SQLSTATE codes used by the proxy itself (the upstream's own errors are relayed untouched).
CONNECTION_EXCEPTION = "08000"
SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION = "08001"
CONNECTION_FAILURE = "08006"
PROTOCOL_VIOLATION = "08P01"
FEATURE_NOT_SUPPORTED = "0A000"
INVALID_AUTHORIZATION_SPECIFICATION = "28000"
SYNTAX_ERROR = "42601"
INSUFFICIENT_PRIVILEGE = "42501"
DUPLICATE_OBJECT = "42710"  # (an upstream error the replication feed expects: its publication already exists)
TOO_MANY_CONNECTIONS = "53300"
CONFIGURATION_LIMIT_EXCEEDED = "53400"
PROGRAM_LIMIT_EXCEEDED = "54000"
OBJECT_NOT_IN_PREREQUISITE_STATE = "55000"
QUERY_CANCELED = "57014"
ADMIN_SHUTDOWN = "57P01"
CANNOT_CONNECT_NOW = "57P03"
IDLE_SESSION_TIMEOUT = "57P05"
CONFIG_FILE_ERROR = "F0000"
INTERNAL_ERROR = "XX000"


class ProxyError(Exception):
    """An error the proxy reports to a client as an ErrorResponse."""

    def __init__(self, sqlstate: str, message: str, *, severity: str = "FATAL", detail: str | None = None):
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.severity = severity
        self.detail = detail


class ProtocolViolation(ProxyError):
    """The peer sent bytes that are not valid PostgreSQL v3 protocol (or exceed a configured limit)."""

    def __init__(self, message: str, *, sqlstate: str = PROTOCOL_VIOLATION, detail: str | None = None):
        super().__init__(sqlstate, message, detail=detail)


class UpstreamError(ProxyError):
    """The upstream PostgreSQL could not be reached, or went away."""

    def __init__(self, message: str, *, sqlstate: str = SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION):
        super().__init__(sqlstate, message)
