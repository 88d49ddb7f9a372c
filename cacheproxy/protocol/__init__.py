"""Sans-IO PostgreSQL v3 protocol: framing, message codecs, startup packets. No asyncio, no sockets, no clock."""
