"""Models and scripts for benchmarks (kept apart from the tests and from the library)."""
