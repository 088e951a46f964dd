"""Hook implementations of the XPU plugin: the module the `xpu` entry point names.

Light on purpose: listing and probing plugins imports this module, so it imports only the
contracts, and the Platform class (which imports no torch at import time) when the hook is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hallm.platforms import hookimpl

if TYPE_CHECKING:
    from hallm.platforms import Platform


@hookimpl
def hallm_platform() -> type[Platform]:
    """The XPU platform."""
    from hallm_xpu.platform import XpuPlatform

    return XpuPlatform
