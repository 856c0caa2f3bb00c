"""All network I/O: listeners, sessions, the upstream connector, the relay, cancels.

The protocol rules live in ``neonlocal.pgwire``; this package only moves bytes between
sockets and those state machines.
"""
