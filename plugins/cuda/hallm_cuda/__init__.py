"""hallm-cuda: the hallm platform plugin for NVIDIA GPUs.

The entry point (`hallm.platforms` -> `cuda`) is `hallm_cuda.plugin`, which imports neither
torch nor triton. `CudaPlatform` lives in `hallm_cuda.platform`, the attention backends in
`hallm_cuda.attention` (the portable Triton kernels of `hallm.ops.triton`), CUDA graphs of decode and prompt steps
in `hallm.ops.torch_graphs` (shared with hallm-rocm), the op table in `hallm.ops.triton.op_table`.
"""

__version__ = "0.1.0"
