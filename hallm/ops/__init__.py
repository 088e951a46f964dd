"""Portable attention kernels: part of hallm's public plugin API.

A plugin may import `hallm.platforms` (the contracts) and `hallm.ops` (these kernels), nothing
else of the core. `hallm.ops.reference` is the pure-torch paged attention that runs on any torch
device: the oracle every backend is checked against, and the CPU platform's default kernel.
`hallm.ops.testing` builds random paged batches (shuffled block tables, NaN-poisoned unused
cache slots) for checking a kernel against the reference. `hallm.ops.triton` (portable Triton
kernels) is imported only where triton is installed.

Importing this package imports no torch; its modules do.
"""
