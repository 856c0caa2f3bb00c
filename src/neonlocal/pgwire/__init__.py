"""Sans-IO PostgreSQL wire protocol: bytes in, messages out; messages in, bytes out.

Nothing in this package imports asyncio, socket or ssl (a unit test checks). The proxy layer
feeds it bytes and writes back whatever it returns. Every exchange (the startup phase, local
authentication, the upstream logins, the reset of a reused session) is a machine of one
shape: ``receive(data)`` returns what to act on, until ``done`` (proxy/drive.py runs them).
"""
