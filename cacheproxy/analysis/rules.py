"""The static cacheability rules: which functions, relations and types make a read's result unfit for a cache.

These lists are a first line of defence. The proxy also checks every called function's volatility in the live
catalog (pg_proc.provolatile), which catches user functions and anything missing here.

Decisions, function by function (PostgreSQL docs 9.9.5 "Current Date/Time", 9.17 "Sequence Manipulation", 9.26
"System Information Functions", 9.27 "System Administration Functions"):
- now, current_timestamp, transaction_timestamp, statement_timestamp, current_time, current_date, localtime,
  localtimestamp: STABLE in the catalog (fixed within a transaction) but their value moves with the clock: denied.
- clock_timestamp, timeofday, random, random_normal, setseed: VOLATILE: denied.
- age: its one-argument form reads the clock; we cannot see arity cheaply in every path, so denied (the two-argument
  form loses caching, a small price).
- nextval, currval, lastval, setval: sequence side effects or session state outside the cache key: denied.
- txid_*, pg_current_xact_id*, pg_current_snapshot, pg_xact_status: transaction state: denied (txid_ prefix,
  pg_ prefix below).
- gen_random_uuid, uuid_generate_* (all versions, conservatively: v3/v5 are deterministic but rare), uuidv4, uuidv7:
  denied.
- set_config: has a side effect on the session: denied.
- pg_*: almost all read catalogs, statistics, the backend's own state (pg_backend_pid, pg_sleep, pg_advisory_*,
  pg_notify, pg_is_in_recovery, pg_relation_size, ...): denied, except the few pure helpers in _PG_ALLOWED.
- has_*_privilege, to_reg*, obj_description, col_description, shobj_description, format_type: read the catalog
  (their answer changes with DDL that the cache does not see as a table write): denied.
- inet_client_addr/port, inet_server_addr/port: differ between upstream connections: denied.
- query_to_xml, table_to_xml, cursor_to_xml, schema_to_xml, database_to_xml (and *_xmlschema), ts_stat, dblink*,
  lo_*: run queries given as text or read large objects, i.e. read relations the analyzer cannot name: denied.
- ALLOWED on purpose: current_setting, current_user, session_user, current_role, current_schema(s),
  current_database, current_catalog, version, pg_typeof, pg_client_encoding: they depend only on session state
  (which the cache key includes) or on nothing.
"""

from __future__ import annotations

from cacheproxy.analysis.model import TableRef

_DENIED = frozenset(
    {
        "now",
        "current_timestamp",
        "current_time",
        "current_date",
        "localtime",
        "localtimestamp",
        "statement_timestamp",
        "transaction_timestamp",
        "clock_timestamp",
        "timeofday",
        "age",
        "random",
        "random_normal",
        "setseed",
        "nextval",
        "currval",
        "lastval",
        "setval",
        "gen_random_uuid",
        "uuidv4",
        "uuidv7",
        "set_config",
        "obj_description",
        "col_description",
        "shobj_description",
        "format_type",
        "inet_client_addr",
        "inet_client_port",
        "inet_server_addr",
        "inet_server_port",
        "ts_stat",
    }
)
_DENIED_PREFIXES = ("txid_", "uuid_generate_", "pg_", "has_", "to_reg", "dblink", "lo_")
_DENIED_XML = ("query_to_xml", "table_to_xml", "cursor_to_xml", "schema_to_xml", "database_to_xml")
_PG_ALLOWED = frozenset(
    {
        "pg_typeof",
        "pg_client_encoding",
        "pg_size_pretty",
        "pg_size_bytes",
        "pg_column_size",
        "pg_encoding_to_char",
        "pg_char_to_encoding",
        "pg_input_is_valid",
        "pg_input_error_info",
    }
)

# Casting text to these types looks the name up in the catalog (regclassin & co. are STABLE): the result changes with
# DDL that is not a write to any table the query reads.
REG_TYPES = frozenset(
    {
        "regclass",
        "regtype",
        "regproc",
        "regprocedure",
        "regoper",
        "regoperator",
        "regnamespace",
        "regrole",
        "regconfig",
        "regdictionary",
        "regcollation",
    }
)

SYSTEM_SCHEMAS = frozenset({"pg_catalog", "information_schema"})


def function_denied(name: str) -> bool:
    """Whether calling `name` ("f" or "schema.f", lower-cased) makes a read not cacheable."""
    schema, _, bare = name.rpartition(".")
    if schema and schema != "pg_catalog":
        return False  # a user function in its own schema: left to the proxy's catalog check
    if bare in _DENIED:
        return True
    if bare.startswith(_DENIED_PREFIXES):
        return not (bare.startswith("pg_") and bare in _PG_ALLOWED)
    return bare.startswith(_DENIED_XML)


def relation_reason(ref: TableRef) -> str | None:
    """Why reading `ref` makes a statement not cacheable, or None."""
    schema, name = ref
    if schema is None:
        if name.startswith("pg_"):
            return f"reads system catalog {name}"
        return None
    if schema in SYSTEM_SCHEMAS or schema == "pg_toast" or schema.startswith("pg_toast_temp"):
        return f"reads system catalog {schema}.{name}"
    if schema == "pg_temp" or schema.startswith("pg_temp_"):
        return f"reads temporary table {schema}.{name}"
    if schema.startswith("pg_"):
        return f"reads system schema {schema}.{name}"
    return None
