"""The reliability suite: load, soak, upstream faults, restarts, hostile input and secrets.

Every test here is marked ``reliability`` (``-m "not reliability"`` skips them); see RESULTS.md.
"""
