"""hallm's conformance kit: how a plugin author knows the backend is right.

A pytest plugin (`hallm.conformance.plugin`) plus its tests, run against one device plugin:

    hallm conformance --device ID [--level 0-3] [--xfails FILE] [--report out.json] [--quick]
    pytest --pyargs hallm.conformance --hallm-device ID [--hallm-level N] [--hallm-xfails FILE]
        [--hallm-report out.json] [--hallm-quick]

Tiers: L0 discovery (no hardware needed), L1 kernels against `hallm.ops.reference`, L2
components (executor lifecycle, KV connectors), L3 end to end (greedy tokens against the CPU
plugin). Tests state the capabilities they need; the plugin's declarations decide what applies.
See docs/writing-a-plugin.md.

Importing this package (and `hallm.conformance.plugin`, which pytest loads through the
`pytest11` entry point in every session) imports nothing but the standard library and pytest:
torch, the engine and the plugin under test load only once the kit's tests run.
"""

from __future__ import annotations

from hallm.version import __version__

#: The kit's version: it is released with the core, in lockstep with the plugin API.
KIT_VERSION = __version__

__all__ = ["KIT_VERSION"]
