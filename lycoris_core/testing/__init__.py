"""Fixtures, not engine: adapters and checkpoints with real names and shapes and seeded values.

``synthetic`` builds any algorithm's tensors for any SD layer (and writes whole synthetic
checkpoints tensor by tensor) for the tests, the benchmarks and the demo; ``demo`` writes
the three small demo adapters the panel and the README's quick start use.  Nothing in the
engine imports this package.
"""
