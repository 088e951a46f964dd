"""hallm-tpu: the hallm platform plugin for Google TPUs, through JAX.

The entry point (`hallm.platforms` -> `tpu`) is `hallm_tpu.plugin`, which imports no jax.
`TpuPlatform` lives in `hallm_tpu.platform`; its worker (`hallm_tpu.worker.TpuWorker`) runs a
jit-compiled JAX model (`hallm_tpu.model`) over a paged KV cache held as device arrays.
"""

__version__ = "0.1.0"
