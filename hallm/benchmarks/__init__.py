"""Benchmarks behind `hallm bench`: each measures hallm and a peer in the same run."""
