"""A tiny application that knows nothing about cacheproxy: it reads DATABASE_URL, like any twelve-factor app.

Point DATABASE_URL at the proxy (same user, password and database as before; only host and port change):
    DATABASE_URL=postgres://app:secret@127.0.0.1:6432/app python examples/app.py
"""

import asyncio
import os

import asyncpg


async def main() -> None:
    conn = await asyncpg.connect(os.environ["DATABASE_URL"])
    try:
        version = await conn.fetchval("SELECT version()")
        rows = await conn.fetch("SELECT g AS n, g * g AS square FROM generate_series(1, 5) g")
        print(version)
        for row in rows:
            print(row["n"], row["square"])
    finally:
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
