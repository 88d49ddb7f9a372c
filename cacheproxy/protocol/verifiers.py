"""Password verifiers as PostgreSQL stores them (pg_authid.rolpassword) and PgBouncer's userlist.txt (sans-IO).

A verifier is one of: ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`` (base64 parts, RFC 5803 as
PostgreSQL writes it), ``md5`` + 32 hex digits (md5(password + user)), or anything else: a plain password (only in
an auth file). userlist.txt: one ``"user" "verifier"`` pair a line, ``""`` inside quotes for a quote; blank lines
and lines starting with ``;`` or ``#`` are ignored.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from cacheproxy.protocol.client_auth import saslprep

SCRAM_ITERATIONS = 4096  # PostgreSQL's default scram_iterations
_MD5 = re.compile(r"md5[0-9a-f]{32}")
_SCRAM = re.compile(r"SCRAM-SHA-256\$(\d+):([^$]+)\$([^:]+):(.+)")
_QUOTED = re.compile(r'\s*"((?:[^"]|"")*)"')


@dataclass(frozen=True, slots=True, repr=False)
class ScramVerifier:
    """What a SCRAM-SHA-256 server stores: enough to check a proof, never enough to make one."""

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes


@dataclass(frozen=True, slots=True, repr=False)
class Md5Verifier:
    """``md5`` + md5(password + user): what md5 authentication checks (and, alas, all it needs to log in)."""

    digest: str


@dataclass(frozen=True, slots=True, repr=False)
class PlainPassword:
    """A password written in clear in an auth file."""

    password: str


Verifier = ScramVerifier | Md5Verifier | PlainPassword


def parse_verifier(text: str) -> Verifier:
    """Read a stored verifier; a text that is neither SCRAM nor md5 is a plain password.

    >>> v = parse_verifier("SCRAM-SHA-256$4096:c2FsdA==$" + "QUFB" * 10 + "QUE=:" + "QkJC" * 10 + "QkI=")
    >>> (v.iterations, v.salt, v.stored_key == b"A" * 32, v.server_key == b"B" * 32)
    (4096, b'salt', True, True)
    >>> parse_verifier("md5" + "0" * 32).digest == "md5" + "0" * 32, type(parse_verifier("hunter2")).__name__
    (True, 'PlainPassword')
    """
    if _MD5.fullmatch(text):
        return Md5Verifier(text)
    match = _SCRAM.fullmatch(text)
    if match is None:
        if text.startswith("SCRAM-SHA-256$"):
            raise ValueError("malformed SCRAM-SHA-256 verifier")
        return PlainPassword(text)
    try:
        salt, stored, server = (base64.b64decode(match.group(i), validate=True) for i in (2, 3, 4))
    except binascii.Error as exc:
        raise ValueError("malformed SCRAM-SHA-256 verifier: bad base64") from exc
    iterations = int(match.group(1))
    if iterations < 1 or len(stored) != 32 or len(server) != 32:
        raise ValueError("malformed SCRAM-SHA-256 verifier: bad iteration count or key length")
    return ScramVerifier(iterations, salt, stored, server)


def scram_verifier(password: str, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> ScramVerifier:
    """The verifier PostgreSQL would store for `password` (a random 16-byte salt unless given)."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", saslprep(password), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return ScramVerifier(iterations, salt, hashlib.sha256(client_key).digest(), server_key)


def md5_verifier(user: str, password: str) -> Md5Verifier:
    return Md5Verifier("md5" + hashlib.md5(password.encode() + user.encode()).hexdigest())


def parse_userlist(text: str) -> dict[str, str]:
    """userlist.txt -> {user: verifier text}; a malformed line raises ValueError naming its number.

    >>> parse_userlist('; comment\\n"alice" "md5abc"\\n"o""brien" "pw"\\n')
    {'alice': 'md5abc', 'o"brien': 'pw'}
    """
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in ";#":
            continue
        user = _QUOTED.match(line)
        secret = _QUOTED.match(line, user.end()) if user is not None else None
        if user is None or secret is None or line[secret.end() :].strip():
            raise ValueError(f'line {number}: expected "user" "password"')
        users[user.group(1).replace('""', '"')] = secret.group(1).replace('""', '"')
    return users
