"""Microbenchmarks: every provider measured in the same run, reported as a ratio to a baseline.

Each module in this package (not starting with ``_``) that defines ``BENCHMARKS``, a dict of
name -> ``fn(ctx) -> iterable of Group``, is discovered by ``python -m slimtune.bench``.
"""

from .harness import Context, Group, discover, run_groups

__all__ = ["Context", "Group", "discover", "run_groups"]
