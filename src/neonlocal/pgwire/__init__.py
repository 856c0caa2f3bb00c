"""Sans-IO PostgreSQL wire protocol: bytes in, messages out; messages in, bytes out.

Nothing in this package imports asyncio, socket or ssl (a unit test checks). The proxy layer
feeds it bytes and writes back whatever it returns.
"""
