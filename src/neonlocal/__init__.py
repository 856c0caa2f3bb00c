"""neonlocal: one fixed local Postgres address for your Neon branches."""

__version__ = "0.1.0"
