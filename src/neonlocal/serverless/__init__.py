"""The serverless driver's side of the daemon: ``POST /sql`` and WebSocket sessions.

HTTP requests reach the daemon on its PostgreSQL port (the listener tells them by their first
byte). ``gateway`` and ``http`` are imported only when the first one arrives, so an idle
daemon that no JavaScript app talks to carries neither them nor h11 and wsproto; this
package's own import therefore loads nothing.
"""
