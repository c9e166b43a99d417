"""Helpers shared by the tests and the benchmarks (not part of the wheel): a tiny model on the
real tokenizer, an isolated environment, and real service processes (``testkit.stack``)."""
