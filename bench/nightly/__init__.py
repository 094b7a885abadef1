"""The parts of bench.subscriptions, the nightly-run benchmark, split by job (see that module's docstring)."""
