"""Helpers shared by the tests and the benchmarks (not part of the wheel): a tiny model on the
real tokenizer, an isolated environment, real service processes (``testkit.stack``) and a
fake clock (``testkit.clock``)."""
