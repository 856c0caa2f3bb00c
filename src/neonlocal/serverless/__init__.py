"""The serverless driver's side of the daemon: ``POST /sql`` and WebSocket sessions.

HTTP requests reach the daemon on its PostgreSQL port (the listener tells them by their first
byte). This package is imported only when the first one arrives, so an idle daemon that no
JavaScript app talks to carries neither it nor h11 and wsproto.
"""

from __future__ import annotations

from neonlocal.serverless.gateway import Gateway
from neonlocal.serverless.http import HttpConnection

__all__ = ["Gateway", "HttpConnection"]
