"""Hook implementations of the TPU plugin: the module the `tpu` entry point names.

Light on purpose: listing and probing plugins imports this module, so it imports only the
contracts, and the Platform class (which imports no jax either) when the hook is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hallm.platforms import hookimpl

if TYPE_CHECKING:
    from hallm.platforms import Platform


@hookimpl
def hallm_platform() -> type[Platform]:
    """The TPU platform."""
    from hallm_tpu.platform import TpuPlatform

    return TpuPlatform
