"""The module the `template` entry point names: pluggy hook implementations.

hallm imports this module to list and probe plugins, so keep it light: import the contracts
only, and your Platform class inside the hook. Never import a device runtime (your SDK, a
compiler, torch extensions) at the top of this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hallm.platforms import hookimpl

if TYPE_CHECKING:
    from hallm.platforms import Platform


@hookimpl
def hallm_platform() -> type[Platform]:
    """This plugin's Platform subclass (required in a `hallm.platforms` plugin)."""
    from hallm_plugin_template.platform import TemplatePlatform

    return TemplatePlatform


# Optional contribution hooks (see hallm.platforms.hookspecs). Each one is a plain function
# decorated with @hookimpl; a misspelled hook name fails at load, loudly. For example, to add an
# attention backend to another platform (only where the platform is one you serve):
#
# @hookimpl
# def hallm_attention_backends(platform: Platform) -> Sequence[type[AttentionBackend]]:
#     if platform.name != "cuda":
#         return []
#     from hallm_plugin_template.attention import TemplateAttention
#     return [TemplateAttention]
#
# Likewise `hallm_executors()`, `hallm_kv_connectors()` and `hallm_models()` return
# {name: class} mappings of Executor, KVConnector and model classes.
