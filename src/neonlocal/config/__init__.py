"""The configuration: the file's rules, the values the daemon holds, and the file itself.

- ``schema``: the rules of the TOML file and the ``NEONLOCAL_*`` environment (pydantic);
  only the CLI and the short-lived checking child import it.
- ``values``: the same configuration as frozen plain values, which the daemon holds.
- ``loader``: how the daemon loads and checks an edit without importing the schema.
- ``file``: the file as text: where each key is written, and ``branch`` rewritten in place.
- ``errors``: what can be wrong with a configuration, and where.

This ``__init__`` imports none of them, so the daemon's ``neonlocal.config.values`` never
brings the schema along (README, "The daemon's memory").
"""
