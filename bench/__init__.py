"""Benchmarks: `make bench` prints JSON figures, compared as ratios inside one run."""
