"""Who is at the other end of a Unix-socket connection: the OS user, as the kernel says.

libpq names the role after the OS user when none is given, so `psql -d neondb` as "maria"
asks for role "maria", which no Neon branch has. Over our owner-only Unix socket the
kernel tells us that OS user (SO_PEERCRED, as PostgreSQL's peer authentication reads it),
so such a default can be told apart from a role the client chose.
"""

from __future__ import annotations

import pwd
import socket
import struct

__all__ = ["peer_user_name"]

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_user_name(sock: socket.socket | None) -> str | None:
    """The OS user name of a Unix-socket peer; None elsewhere (TCP, or no SO_PEERCRED)."""
    peercred = getattr(socket, "SO_PEERCRED", None)
    if sock is None or sock.family != socket.AF_UNIX or peercred is None:
        return None
    try:
        _pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, peercred, _UCRED.size))
        return pwd.getpwuid(uid).pw_name
    except (OSError, KeyError, struct.error):
        return None
