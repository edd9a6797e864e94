"""hyperkern benchmarks and reports (run as python -m bench.<name> from the repository root)."""
