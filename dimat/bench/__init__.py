"""Benchmarks behind ``dimat bench``; each prints a table and writes JSON/markdown into ``--out``."""
