"""Linear layers over a decode batch of up to 256 rows: `y = x @ W.T + b` in one Triton kernel.

Why: at 64-256 rows a decode projection's bytes and flops are in near balance (Llama-3.1-8B at
192 rows: the weight stream at ~3 TB/s and the tensor cores at ~700 TFLOP/s are within 20% of
each other), so a kernel must read each weight byte from HBM once while its dots keep up.
- A program owns BLOCK_N output columns and ALL the rows, as CHUNKS accumulators of BLOCK_M
  (64: one Hopper warpgroup MMA) rows: each weight tile [BLOCK_N, BLOCK_K] in shared memory
  feeds one dot per chunk, so the weight is streamed once and only the activations (a few MB)
  are re-read, from L2. Chunks, not one accumulator padded to a power of two (`tl.arange`
  needs powers of two): 192 rows padded to 256 would add a third to the tensor-core time,
  which here is the other limit. Programs along M (a row block each) would instead read each
  weight tile once per row block, so the L2 would carry the weight several times over.
- Operands come by pointers (rows past M and columns past N clamped to the last valid one,
  loaded but never stored, so no row masks) or, with `tma`, by tensor descriptors: on Hopper
  the TMA unit fetches the tiles (zero-filled past the edges), and the threads hold no
  addresses next to the accumulators.
- The work is (column block, K tile) units, column block by column block; program p of P
  takes units [p U / P, (p + 1) U / P). P = column blocks is a plain GEMM; P = column blocks x
  split_k is split-K, for a matrix whose column blocks leave SMs idle (N = 4096 at BLOCK_N =
  128 is 32 programs); with `stream_k` P is the SM count, so that no wave runs part empty
  (gate/up's 224 column blocks are 1.7 waves on 132 SMs). A program that covers part of a
  column block stores its fp32 partial sums, and the last one to finish the block (an atomic
  tile counter, which it resets so that a CUDA graph replays the launch) sums the partials
  in program order (the same bits whichever finishes last) and stores the output. A partial
  is M x BLOCK_N fp32, at 192 rows the bytes of 384 K columns of the block's weight rows, and
  one program reads them all: `with_work_split` splits only where idle SMs cost more
  (`split_cost`, a model).
`benchmarks/gpu_decode_gemm.py` times the shipped configuration against cuBLAS and a
sweep of the others.
"""

from __future__ import annotations

import dataclasses
import functools
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from hallm.ops.triton.runtime import decorate, gdc_launch_dependents, gdc_wait, interpreting, pdl_launch
from hallm.ops.triton.skinny_launch import counters_for
from hallm.ops.triton.target import GENERIC, TritonTarget

__all__ = [
    "MAX_ROWS",
    "DecodeGemmConfig",
    "counters_for",
    "decode_gemm_config",
    "decode_linear",
    "jit_kernels",
    "split_cost",
    "with_work_split",
]

#: Most rows a launch takes; larger batches are GEMMs (F.linear).
MAX_ROWS = 256
#: Most row chunks (accumulators) a program holds.
MAX_CHUNKS = 8
#: Threads per program (8 warps on NVIDIA: two warpgroups share each 64-row chunk's columns).
DECODE_THREADS = 256
#: Shared memory left free of the pipeline's stages (the kernel's other scratch).
SHARED_RESERVE = 8 * 1024
_MAX_SPLIT_K = 8


@dataclasses.dataclass(frozen=True)
class DecodeGemmConfig:
    """Tiles and work split of one launch: a program holds cdiv(M, block_m) accumulators of
    [block_m, block_n]; split_k programs share each column block's K tiles, or with stream_k
    one program per SM shares all of them; tma loads the operands by tensor descriptors."""

    block_n: int = 128
    block_k: int = 64
    block_m: int = 64
    split_k: int = 1
    stream_k: bool = False
    tma: bool = False
    num_warps: int = 8
    num_stages: int = 4

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k", "block_m"):
            v = getattr(self, name)
            if v < 16 or v > 256 or v & (v - 1):
                raise ValueError(f"DecodeGemmConfig.{name} must be a power of two in [16, 256], got {v}")
        if not 1 <= self.split_k <= 64 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"{self}: split_k must be in [1, 64], num_warps and num_stages >= 1")

    def stage_bytes(self, m: int, itemsize: int = 2) -> int:
        """Shared memory of one pipeline stage at M rows: every chunk's tile and the weight's."""
        return (triton.cdiv(m, self.block_m) * self.block_m + self.block_n) * self.block_k * itemsize


# fmt: off
def _decode_gemm_kernel(  # type: ignore[no-untyped-def]
    x_ptr, w_ptr, bias_ptr, out_ptr, part_ptr, counter_ptr,
    M, N, K, x_stride, out_stride, TILES, UNITS, PROGRAMS, SLOTS,
    HAS_BIAS: tl.constexpr, TMA: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr,
    CHUNKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    # fmt: on
    # x [M, K] (row stride x_stride), w [N, K] contiguous, or with TMA their descriptors
    # (blocks [BLOCK_M, BLOCK_K] and [BLOCK_N, BLOCK_K]); out [M, N] (row stride out_stride).
    # TILES K tiles per column block, UNITS = column blocks x TILES units over PROGRAMS.
    # part fp32 [PROGRAMS x SLOTS, M, BLOCK_N]: slot 0 a program's partial sums of its first
    # column block, slot 1 of its last; counter int32 [column blocks]: K tiles summed so far.
    # SPLIT: programs share column blocks; without it part and counter are stand-ins (the
    # output) and the code that reads them is compiled out.
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    start = (pid.to(tl.int64) * UNITS // PROGRAMS).to(tl.int32)
    end = ((pid + 1).to(tl.int64) * UNITS // PROGRAMS).to(tl.int32)
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
    u = start
    while u < end:  # one column block's tiles [t0, t1) per iteration
        col = u // TILES
        t0 = u - col * TILES
        t1 = tl.minimum(end - col * TILES, TILES)
        cols = col * BLOCK_N + rn
        w_rows = tl.minimum(cols, N - 1).to(tl.int64) * K
        # one accumulator per row chunk: a tuple, built by concatenation (Triton's code
        # generator has no starred expressions)
        accs = ()
        for _ in tl.static_range(CHUNKS):
            accs = accs + (tl.zeros([BLOCK_M, BLOCK_N], tl.float32),)  # type: ignore[assignment]  # noqa: RUF005
        for t in range(t0, t1):
            k = t * BLOCK_K + rk
            if TMA:
                w = w_ptr.load([col * BLOCK_N, t * BLOCK_K])
            elif EVEN_K:
                w = tl.load(w_ptr + w_rows[:, None] + k[None, :])
            else:
                w = tl.load(w_ptr + w_rows[:, None] + k[None, :], mask=(k < K)[None, :], other=0.0)
            summed = ()
            for c in tl.static_range(CHUNKS):
                x_rows = tl.minimum(c * BLOCK_M + rm, M - 1)[:, None] * x_stride
                if TMA:
                    x = x_ptr.load([c * BLOCK_M, t * BLOCK_K])
                elif EVEN_K:
                    x = tl.load(x_ptr + x_rows + k[None, :])
                else:
                    x = tl.load(x_ptr + x_rows + k[None, :], mask=(k < K)[None, :], other=0.0)
                if DOT_F32:
                    x, w_t = x.to(tl.float32), tl.trans(w.to(tl.float32))
                    acc = tl.dot(x, w_t, accs[c], input_precision="ieee")
                else:
                    acc = tl.dot(x, tl.trans(w), accs[c])
                summed = summed + (acc,)  # type: ignore[assignment]  # noqa: RUF005
            accs = summed

        n_mask = cols < N
        bias = tl.zeros([BLOCK_N], tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)
        if (t0 == 0) & (t1 == TILES):  # the whole column block: store it
            for c in tl.static_range(CHUNKS):
                rows = c * BLOCK_M + rm
                y = (accs[c] + bias[None, :]).to(out_ptr.dtype.element_ty)
                out_mask = (rows < M)[:, None] & n_mask[None, :]
                tl.store(out_ptr + rows[:, None] * out_stride + cols[None, :], y, mask=out_mask)
        elif SPLIT:
            # Store this range's partial sums. The barrier orders every thread's stores before
            # the counter's release; the acquire orders the last program's loads (through L2:
            # .cg) after the other programs' stores.
            part = part_ptr + (pid * SLOTS + (u != start).to(tl.int32)).to(tl.int64) * M * BLOCK_N
            for c in tl.static_range(CHUNKS):
                rows = c * BLOCK_M + rm
                tl.store(part + rows[:, None] * BLOCK_N + rn[None, :], accs[c], mask=(rows < M)[:, None])
            tl.debug_barrier()
            seen = tl.atomic_add(counter_ptr + col, t1 - t0, sem="acq_rel", scope="gpu")
            if seen + (t1 - t0) == TILES:
                tl.atomic_xchg(counter_ptr + col, 0, sem="relaxed", scope="gpu")
                # The partials of every program whose range meets this block (the owners of
                # its first and last units and those between; unit v's owner is
                # ((v + 1) P - 1) // U), its own among them, one chunk at a time: the
                # accumulators are dead here, their registers free.
                first = (((col * TILES + 1).to(tl.int64) * PROGRAMS - 1) // UNITS).to(tl.int32)
                last = ((((col + 1) * TILES).to(tl.int64) * PROGRAMS - 1) // UNITS).to(tl.int32)
                for c in tl.static_range(CHUNKS):
                    rows = c * BLOCK_M + rm
                    offsets = rows[:, None] * BLOCK_N + rn[None, :]
                    y = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                    for q in range(first, last + 1):
                        # this block is q's first range if q starts inside it, else its last
                        q_start = (tl.cast(q, tl.int64) * UNITS // PROGRAMS).to(tl.int32)
                        q_slot = q * SLOTS + (q_start < col * TILES).to(tl.int32)
                        q_part = part_ptr + q_slot.to(tl.int64) * M * BLOCK_N + offsets
                        y += tl.load(q_part, mask=(rows < M)[:, None], other=0.0, cache_modifier=".cg")
                    y = (y + bias[None, :]).to(out_ptr.dtype.element_ty)
                    out_mask = (rows < M)[:, None] & n_mask[None, :]
                    tl.store(out_ptr + rows[:, None] * out_stride + cols[None, :], y, mask=out_mask)
        u = col * TILES + t1


@functools.cache
def _kernels(interpret: bool) -> SimpleNamespace:
    # The work split's ints are not specialized (divisible by 16, equal to 1), so that every
    # split of a tile configuration runs one compiled kernel.
    work = ("M", "TILES", "UNITS", "PROGRAMS", "SLOTS")
    return SimpleNamespace(decode_gemm=decorate(_decode_gemm_kernel, interpret, do_not_specialize=work))


def jit_kernels() -> SimpleNamespace:
    return _kernels(False)


def _programs(cfg: DecodeGemmConfig, col_blocks: int, tiles: int, target: TritonTarget) -> int:
    """Programs of a launch: one per column block, split_k per column block, or (stream_k) one
    per SM; never more than the units, so that every program has one at least."""
    programs = target.num_sms if cfg.stream_k else col_blocks * cfg.split_k
    return max(1, min(programs, col_blocks * tiles))


def split_cost(cfg: DecodeGemmConfig, m: int, n: int, k: int, target: TritonTarget | None = None) -> float:
    """A launch's modelled time in weight-tile loads of its slowest SM (one program per SM: the
    stages fill its shared memory): its waves times the K tiles per program, plus, where column
    blocks are shared, one partial written or read per contributor (M rows of fp32 are 2 M /
    BLOCK_K weight tiles of bytes; through L2, taken at half the HBM cost)."""
    target = target or GENERIC
    col_blocks, tiles = triton.cdiv(n, cfg.block_n), triton.cdiv(k, cfg.block_k)
    programs = _programs(cfg, col_blocks, tiles, target)
    waves = triton.cdiv(programs, target.num_sms)
    if programs == col_blocks:
        return waves * tiles
    if programs % col_blocks == 0:
        contributors = programs // col_blocks
    else:
        contributors = triton.cdiv(tiles, col_blocks * tiles // programs) + 1
    rows = triton.cdiv(m, cfg.block_m) * cfg.block_m
    return waves * triton.cdiv(col_blocks * tiles, programs) + contributors * rows / cfg.block_k


def with_work_split(
    cfg: DecodeGemmConfig, m: int, n: int, k: int, target: TritonTarget | None = None
) -> DecodeGemmConfig:
    """`cfg` with the work split that `split_cost` rates fastest: none, split_k 2-8, or
    stream_k (of equals, the first: the fewest programs)."""
    target = target or GENERIC
    tiles = triton.cdiv(k, cfg.block_k)
    top = min(_MAX_SPLIT_K, tiles)
    splits = [dataclasses.replace(cfg, split_k=s, stream_k=False) for s in range(1, top + 1)]
    if triton.cdiv(n, cfg.block_n) * tiles > target.num_sms:
        splits.append(dataclasses.replace(cfg, split_k=1, stream_k=True))
    return min(splits, key=lambda c: split_cost(c, m, n, k, target))


def decode_gemm_config(m: int, n: int, k: int, target: TritonTarget | None = None) -> DecodeGemmConfig:
    """The shipped configuration for M rows x N outputs x K inputs on `target` (None: GENERIC),
    from shapes only (host ints, fixed for a captured batch size): 64-row chunks, 128 x 64
    weight tiles by pointers (thinner where two stages do not fit the target's shared memory),
    as many pipeline stages (2-4) as fit, and the work split of `with_work_split`."""
    target = target or GENERIC
    block_m = 64 if m > 32 else max(16, triton.next_power_of_2(m))
    cfg = DecodeGemmConfig(block_m=block_m, num_warps=target.warps(DECODE_THREADS))
    budget = target.shared_memory_bytes - SHARED_RESERVE
    while 2 * cfg.stage_bytes(m) > budget and cfg.block_k > 16:  # a small shared memory: thinner tiles
        cfg = dataclasses.replace(cfg, block_k=cfg.block_k // 2)
    stages = max(2, min(4, budget // cfg.stage_bytes(m)))
    return with_work_split(dataclasses.replace(cfg, num_stages=stages), m, n, k, target)


def _descriptor_ok(t: torch.Tensor) -> bool:
    """Whether a TMA descriptor can address `t` (16-byte aligned base and row stride)."""
    return t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 and t.stride(1) == 1


def decode_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: DecodeGemmConfig | None = None,
    counters: torch.Tensor | None = None,
    target: TritonTarget | None = None,
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for float16/bfloat16 x [M, K], M <= MAX_ROWS (last dim
    contiguous), and a contiguous weight [N, K] of x's dtype. config: None picks
    `decode_gemm_config(M, N, K, target)`. counters: from `counters_for(N)`, kept by the caller
    so that a captured graph reuses them (allocated here when None and the work is split)."""
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"decode_linear takes x [M, K] and weight [N, K], got {x.shape} and {weight.shape}")
    (m, k), n = x.shape, weight.shape[0]
    if x.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != x.dtype:
        raise ValueError(
            f"decode_linear takes float16 or bfloat16 x and a weight of its dtype, got {x.dtype} "
            f"and {weight.dtype}; use F.linear for other dtypes"
        )
    if m > MAX_ROWS:
        raise ValueError(f"decode_linear takes at most {MAX_ROWS} rows, got {m}; use F.linear (a GEMM)")
    if weight.shape[1] != k or k == 0:
        raise ValueError(f"weight {tuple(weight.shape)} must be [N, K] with x's K = {k} (>= 1) columns")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous [N, K]; call weight.contiguous() once when loading it")
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be {x.dtype} [{n}], got {bias.dtype} {tuple(bias.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    target = target or GENERIC
    cfg = config or decode_gemm_config(m, n, k, target)
    chunks = triton.cdiv(m, cfg.block_m)
    if chunks > MAX_CHUNKS:
        raise ValueError(f"{cfg} has {chunks} row chunks for {m} rows, at most {MAX_CHUNKS}: raise block_m")
    col_blocks, tiles = triton.cdiv(n, cfg.block_n), triton.cdiv(k, cfg.block_k)
    programs = _programs(cfg, col_blocks, tiles, target)
    slots = 1 if programs % col_blocks == 0 else 2  # ranges that reach into a second column block
    part = counter = out  # stand-ins where each program owns one column block (not read)
    if programs != col_blocks:
        part = torch.empty((programs * slots, m, cfg.block_n), dtype=torch.float32, device=x.device)
        counter = counters if counters is not None else counters_for(n, x.device)
        if counter.dtype != torch.int32 or counter.numel() < col_blocks:
            raise ValueError(f"counters must be int32 with >= {col_blocks} entries: use counters_for({n}, device)")
    x_arg: object = x
    w_arg: object = weight
    tma = cfg.tma and _descriptor_ok(x) and _descriptor_ok(weight)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        x_arg = TensorDescriptor.from_tensor(x, [cfg.block_m, cfg.block_k])
        w_arg = TensorDescriptor.from_tensor(weight, [cfg.block_n, cfg.block_k])
    # fmt: off
    _kernels(interpreting()).decode_gemm[(programs,)](
        x_arg, w_arg, bias if bias is not None else weight, out, part, counter,
        m, n, k, x.stride(0), out.stride(0), tiles, col_blocks * tiles, programs, slots,
        HAS_BIAS=bias is not None, TMA=tma, EVEN_K=k % cfg.block_k == 0,
        # the interpreter's 16-bit dot is broken (triton 3.9 reinterprets the bits): fp32 there
        DOT_F32=interpreting(),
        CHUNKS=chunks, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        SPLIT=programs != col_blocks, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_launch(target),
    )
    # fmt: on
    return out
