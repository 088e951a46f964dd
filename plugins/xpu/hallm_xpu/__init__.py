"""hallm-xpu: the hallm platform plugin for Intel GPUs through torch.xpu.

The entry point (`hallm.platforms` -> `xpu`) is `hallm_xpu.plugin`, which imports no torch.
`XpuPlatform` lives in `hallm_xpu.platform`, the attention backends in `hallm_xpu.attention`.
"""

__version__ = "0.1.0"
