"""Hostile bytes into the sans-IO decoders: a ProtocolViolation or a value, never another exception."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cacheproxy.errors import ProtocolViolation
from cacheproxy.protocol import frontend as fe
from cacheproxy.protocol.framing import Framer
from cacheproxy.protocol.startup import decode_startup

DECODERS: list[Callable[[bytes], object]] = [
    fe.decode_parse,
    fe.decode_bind,
    fe.decode_describe,
    fe.decode_execute,
    fe.decode_close,
    fe.decode_query,
    decode_startup,
]


@pytest.mark.parametrize("decoder", DECODERS, ids=lambda d: d.__name__)
@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200))
def test_decoders_reject_garbage_cleanly(decoder: Callable[[bytes], object], body: bytes) -> None:
    try:
        decoder(body)
    except ProtocolViolation as exc:
        assert exc.sqlstate and exc.message


@settings(max_examples=300, deadline=None)
@given(stream=st.binary(max_size=400), cut=st.integers(min_value=0, max_value=400))
def test_framer_never_fails_otherwise(stream: bytes, cut: int) -> None:
    framer = Framer(1 << 16)
    try:
        framer.feed(stream[:cut])
        framer.feed(stream[cut:])
    except ProtocolViolation as exc:
        assert exc.sqlstate in ("08P01", "54000")
