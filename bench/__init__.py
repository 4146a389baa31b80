"""Benchmarks that print JSON ratios, each measured against a baseline in the same run (`make bench`)."""
