"""Benchmarks: scripts run as `python -m bench.<name>`; results and methods in bench/RESULTS.md."""
