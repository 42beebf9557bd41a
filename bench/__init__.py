"""memsess benchmarks: steady state, goal ratios, failover timelines, threads.

Run everything with ``python -m bench`` (or ``bench/run``); ``--smoke`` runs
each part with tiny counts, for CI. See docs/performance.md for the numbers.
"""
