"""Benchmarks of fastft: users of its public API only (DESIGN.md, layer 5); not part of the installed package."""
