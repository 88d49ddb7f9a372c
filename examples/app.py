"""A tiny application that knows nothing about cacheproxy: it reads DATABASE_URL, like any twelve-factor app.

Point DATABASE_URL at the proxy (same user, password and database as before; only host and port change):
    DATABASE_URL=postgres://app:secret@127.0.0.1:6432/app python examples/app.py

It creates and fills a small `products` table if it is missing, runs a read-heavy loop (lookups of a hot set of
products by id, and one aggregate), then writes once and reads the row back: a write through the proxy invalidates
what it touches, so the read sees it. APP_ROUNDS (default 200) sets the number of rounds; the last line is
"app: ok ..." with the timings. Needs asyncpg, which the cacheproxy image already has.
"""

from __future__ import annotations

import asyncio
import os
import time

import asyncpg

HOT_IDS = range(1, 21)
SETUP = """
CREATE TABLE IF NOT EXISTS products (id int PRIMARY KEY, name text NOT NULL, price numeric(10, 2) NOT NULL);
INSERT INTO products SELECT g, 'product ' || g, 9.99 + g FROM generate_series(1, 100) g ON CONFLICT (id) DO NOTHING;
"""


async def read_round(conn: asyncpg.Connection) -> None:
    for product_id in HOT_IDS:
        await conn.fetchrow("SELECT name, price FROM products WHERE id = $1", product_id)
    await conn.fetchrow("SELECT count(*) AS n, avg(price) AS mean FROM products")


async def main() -> None:
    rounds = int(os.environ.get("APP_ROUNDS", "200"))
    conn = await asyncpg.connect(os.environ["DATABASE_URL"])
    try:
        print(await conn.fetchval("SELECT version()"))
        await conn.execute(SETUP)
        start = time.perf_counter()
        await read_round(conn)  # the first round fills the cache
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(rounds - 1):
            await read_round(conn)
        rest = (time.perf_counter() - start) / max(rounds - 1, 1)
        queries = rounds * (len(HOT_IDS) + 1)
        print(f"{queries} reads: first round {first * 1000:.1f} ms, later rounds {rest * 1000:.1f} ms on average")

        # Read your own write: the update invalidates the cached row before its reply reaches us.
        price = await conn.fetchval("SELECT price FROM products WHERE id = 1")
        await conn.execute("UPDATE products SET price = price + 1 WHERE id = 1")
        new_price = await conn.fetchval("SELECT price FROM products WHERE id = 1")
        if new_price != price + 1:
            raise SystemExit(f"app: stale read after a write: {price} -> {new_price}")
        print(f"app: ok {queries} reads, {rest * 1000:.2f} ms per round after the first; price {price} -> {new_price}")
    finally:
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
