"""SQL analysis: statement kind, tables read and written, functions called, and the static cacheability verdict.

The only package of cacheproxy that imports sqlglot (in `syntax.py`).
"""

from cacheproxy.analysis.analyzer import Analyzer, analyze
from cacheproxy.analysis.fingerprint import fingerprint
from cacheproxy.analysis.model import (
    UNKNOWN_TABLE,
    Kind,
    QueryInfo,
    SessionChange,
    TableRef,
    TxInfo,
    TxOp,
)

__all__ = [
    "UNKNOWN_TABLE",
    "Analyzer",
    "Kind",
    "QueryInfo",
    "SessionChange",
    "TableRef",
    "TxInfo",
    "TxOp",
    "analyze",
    "fingerprint",
]
