"""Benchmarks and the evaluation suite: scripts anyone can run (see BENCHMARKS.md)."""
