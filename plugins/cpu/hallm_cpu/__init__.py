"""hallm-cpu: the hallm platform plugin for the host CPU.

The entry point (`hallm.platforms` -> `cpu`) is `hallm_cpu.plugin`, which imports no torch.
`CpuPlatform` lives in `hallm_cpu.platform`, its attention backend in `hallm_cpu.attention`.
"""

__version__ = "0.1.0"
