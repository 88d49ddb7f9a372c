"""The asyncio layer: listener, sessions, upstream connections. It imports the other packages, never the reverse."""
