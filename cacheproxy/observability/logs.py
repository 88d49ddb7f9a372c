"""Log setup: one line per event, as text or as JSON (orjson). Callers never pass secrets to the logger.

Some lines quote SQL a client sent (the slow-query warning), and SQL can carry a password (`ALTER ROLE ... PASSWORD
'...'`, a conninfo string given to dblink or CREATE SUBSCRIPTION): both formatters mask those before writing.
"""

from __future__ import annotations

import logging
import re
import sys
import time

import orjson

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# PASSWORD '...' / E'...' / $tag$...$tag$ (CREATE/ALTER ROLE, USER MAPPING options); a quoted literal only, so that
# prose such as "password authentication failed" is left alone.
_SQL_PASSWORD = re.compile(r"(?i)\b(password\s+)(E?'(?:[^']|'')*'|\$(\w*)\$.*?\$\3\$)", re.DOTALL)
# password=value inside a libpq conninfo string.
_CONNINFO_PASSWORD = re.compile(r"(?i)\b(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s']+)")
# scheme://user:password@host in a URL.
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^:/@\s']*:)([^@\s']+)(@)")


def redact(text: str) -> str:
    """`text` with the passwords SQL or a connection string may carry replaced by ****.

    >>> redact("slow query (0.1s, ddl bypass): ALTER ROLE carol PASSWORD 'it''s secret' VALID UNTIL 'infinity'")
    "slow query (0.1s, ddl bypass): ALTER ROLE carol PASSWORD '****' VALID UNTIL 'infinity'"
    >>> redact("SELECT dblink_connect('host=db password=s3cret user=u'), 'postgres://u:pw@h/db'")
    "SELECT dblink_connect('host=db password=**** user=u'), 'postgres://u:****@h/db'"
    >>> redact('password authentication failed for user "alice"')
    'password authentication failed for user "alice"'
    """
    if "assword" not in text and "ASSWORD" not in text and "://" not in text:
        return text  # the common case: no scan
    text = _SQL_PASSWORD.sub(r"\1'****'", text)
    text = _CONNINFO_PASSWORD.sub(r"\1****", text)
    return _URL_PASSWORD.sub(r"\1****\3", text)


class TextFormatter(logging.Formatter):
    """The text line, passwords masked (see `redact`)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (and exc when there is a traceback); passwords masked."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(entry).decode()


def configure(level: str = "info", fmt: str = "text") -> None:
    """Route the `cacheproxy` loggers to stderr at `level` in `fmt` ("text" or "json")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(_TEXT_FORMAT))
    root = logging.getLogger("cacheproxy")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
