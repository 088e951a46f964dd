"""hallm-rocm: the hallm platform plugin for AMD GPUs through a ROCm build of torch.

The entry point (`hallm.platforms` -> `rocm`) is `hallm_rocm.plugin`, which imports neither
torch nor triton. `RocmPlatform` lives in `hallm_rocm.platform`; its kernels, decode graphs and
torch.cuda (HIP) calls are the ones it shares with hallm-cuda, in `hallm.ops`.
"""

__version__ = "0.1.0"
