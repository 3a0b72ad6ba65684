"""Latency benchmarks of lookahead decoding and lookahead parallelism (see benchmarks/README.md)."""
