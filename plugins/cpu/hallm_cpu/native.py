"""The CPU plugin's native kernels (csrc/*.c, with csrc/common.h): built at first use, called
through ctypes.

The C sources are compiled into one library once per machine with the system C compiler (`$CC`, else `cc`) as
`-O3 -march=native -fopenmp` and cached under `hallm.platforms.cache_root() / "cpu-kernels"`,
keyed by the sources, the flags, the compiler's version and the CPU's feature flags. Where no
compiler is found or the build fails, `library()` returns None with one warning, and the plugin
keeps to its pure-torch paths; `HALLM_CPU_NATIVE=0` forces that.

The kernels run on the OpenMP runtime torch already loaded (the same `libgomp.so.1`), so they
share torch's threads instead of starting a second pool that would fight it for the cores.
Every wrapper takes CPU tensors whose innermost dimension is contiguous, in float32 or bfloat16.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from hallm.platforms import cache_root, env_flag
from hallm.platforms.env import CPU_NATIVE
from hallm_cpu.memory import empty_weight

logger = logging.getLogger("hallm.cpu")

CSRC = Path(__file__).with_name("csrc")
#: linear.c (GEMM/GEMV on packed weights), elementwise.c, attention.c, decoder.c; common.h is shared.
SOURCES = tuple(sorted(CSRC.glob("*.c")))
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
ARCH_FLAGS = ("-march=native",)
#: Kernel dtype codes (csrc/common.h).
DTYPES = {torch.float32: 0, torch.bfloat16: 1}

_p, _i64, _i32, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "hallm_linear": [_p, _i64, _i32, _p, _p, _i32, _p, _i64, _i64, _i64, _i32],
    "hallm_pack_linear": [_p, _i32, _i64, _i64, _p],
    "hallm_packed_k": [_i32, _i64],
    "hallm_bf16_pairs": [],
    "hallm_rms_norm": [_p, _i64, _p, _i64, _p, _p, _p, _i64, _i64, _f32, _i32, _i32],
    "hallm_rotary": [_p, _i64, _i64, _p, _i64, _i64, _i64, _i64, _p, _p, _f32, _i64, _i32, _i32],
    "hallm_silu_and_mul": [_p, _i64, _p, _i64, _i64, _i32, _i32],
    "hallm_decoder_layers": [
        _p, _i64, _p, _f32,  # layers, n_layers, final norm weight, eps
        _p, _p, _p, _p, _p, _p, _p, _p,  # hidden, residual, h, qkv, attn, gate_up, act, out
        _i64, _i64, _i64, _i64, _i64, _i64, _i64,  # T, H, Hq, Hk, D, I, block size
        _p, _p, _i64, _f32,  # positions, inv_freq, half, rope scaling
        _p, _p, _p, _i64, _p, _i64,  # slot_mapping, query_start_loc, context_lens, R, block_tables, bt_stride
        _i32, _i32,  # dtype, threads
    ],
    "hallm_paged_attention": [
        _p, _i64, _p, _i64, _p, _i64,  # q, k_new, v_new and their token strides
        _p, _i64, _p,  # cache, num_blocks, slot_mapping
        _p, _p, _i64, _p, _i64,  # query_start_loc, context_lens, R, block_tables, bt_stride
        _p, _i64, _i64, _i64, _i64, _i64,  # out, T, Hq, Hk, D, block size
        _f32, _f32, _i64, _p, _i32, _i32,  # scale, soft cap, window, sinks, dtype, threads
    ],
}  # fmt: skip
_RESTYPES = {"hallm_packed_k": _i64, "hallm_bf16_pairs": _i32}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build(cc: str, flags: tuple[str, ...], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [cc, *flags, "-o", tmp, *map(str, SOURCES), "-lm"], check=True, capture_output=True, text=True
        )
        os.replace(tmp, target)  # atomic: a concurrent builder finds a whole file or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = _RESTYPES.get(name)
    return lib


def build(flags: tuple[str, ...] = FLAGS + ARCH_FLAGS) -> ctypes.CDLL:
    """Compile (or find in the cache) and load the kernels with `flags`; raises when that fails."""
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler found (set $CC)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    texts = [p.read_text() for p in (*SOURCES, CSRC / "common.h")]
    key = hashlib.sha256("\0".join([*texts, " ".join(flags), version, _cpu_flags()]).encode())
    path = cache_root() / "cpu-kernels" / f"kernels-{key.hexdigest()[:20]}.so"
    if not path.exists():
        _build(cc, flags, path)
    return _load(path)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None when native kernels are off."""
    if not env_flag(CPU_NATIVE, True):
        return None
    error = ""
    for flags in (FLAGS + ARCH_FLAGS, FLAGS):  # -march=native is unknown to some compilers
        try:
            return build(flags)
        except subprocess.CalledProcessError as exc:
            error = (exc.stderr or str(exc)).strip()[-2000:]
        except OSError as exc:
            error = str(exc)
    logger.warning("native CPU kernels unavailable (%s): the CPU plugin runs its pure-torch kernels", error)
    return None


def available() -> bool:
    """True when the native kernels are built and loaded."""
    return library() is not None


def _lib() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError("hallm-cpu native kernels are not available (see the warning logged at load)")
    return lib


def _dtype(t: torch.Tensor) -> int:
    try:
        return DTYPES[t.dtype]
    except KeyError:
        raise TypeError(f"hallm-cpu native kernels take float32 or bfloat16, got {t.dtype}") from None


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t viewed as [rows, last] with a contiguous last dim (a copy only when it is not)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.dim() != 2:
        t = t.reshape(-1, t.shape[-1])
    return t


#: Output features per panel of a packed weight (csrc/linear.c NR).
PANEL = 16


def bf16_dot() -> bool:
    """True when the kernels multiply bf16 weights with the CPU's bf16 dot-product instructions
    (built for AVX512-BF16); then bf16 panels hold k-pairs (csrc/linear.c)."""
    lib = library()
    return lib is not None and bool(lib.hallm_bf16_pairs())


def pack_linear(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] -> the kernels' panel layout [ceil(N / 16), Kp, 16], same dtype, zero-padded;
    Kp is K, or K rounded up to even for bf16 k-pair panels (`bf16_dot`)."""
    n, k = weight.shape
    w = weight.detach().contiguous()
    lib = _lib()
    packed = empty_weight((-(-n // PANEL), lib.hallm_packed_k(_dtype(w), k), PANEL), w.dtype)
    lib.hallm_pack_linear(w.data_ptr(), _dtype(w), n, k, packed.data_ptr())
    return packed


def linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """x [..., K] (rows may be strided) @ W^T + bias -> [..., out_features] in x's dtype, where
    `packed` = pack_linear(W)."""
    x2 = _rows(x)
    m, k = x2.shape
    y = torch.empty((m, out_features), dtype=x.dtype)
    _lib().hallm_linear(
        x2.data_ptr(), x2.stride(0), _dtype(x2), packed.data_ptr(),
        None if bias is None else bias.data_ptr(), _dtype(packed),
        y.data_ptr(), m, out_features, k, torch.get_num_threads(),
    )  # fmt: skip
    return y.view(*x.shape[:-1], out_features)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x [..., H]; with `residual`, (norm(x + residual), x + residual)."""
    x2 = _rows(x)
    t, h = x2.shape
    # The kernel reads h weights per row and h residual values per row: check the widths here.
    if weight.numel() != h or (residual is not None and residual.shape != x.shape):
        raise ValueError(
            f"rms_norm: input width {h} does not match the norm weight ({weight.numel()})"
            + (
                ""
                if residual is None
                else f" or the residual shape {tuple(residual.shape)} != {tuple(x.shape)}"
            )
            + "; the model's config is inconsistent with its layers (check hidden_size)"
        )
    out = torch.empty((t, h), dtype=x.dtype)
    r2 = None if residual is None else _rows(residual)
    res_out = None if residual is None else torch.empty((t, h), dtype=x.dtype)
    _lib().hallm_rms_norm(
        x2.data_ptr(), x2.stride(0), None if r2 is None else r2.data_ptr(), 0 if r2 is None else r2.stride(0),
        weight.data_ptr(), out.data_ptr(), None if res_out is None else res_out.data_ptr(),
        t, h, float(eps), _dtype(x2), torch.get_num_threads(),
    )  # fmt: skip
    if res_out is None:
        return out.view(x.shape)
    return out.view(x.shape), res_out.view(x.shape)


def rotary_(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, inv_freq: torch.Tensor, scaling: float
) -> None:
    """NeoX rotate-half of q [T, Hq, D] and k [T, Hk, D] in place (heads D apart, tokens strided).

    positions int64 [T]; inv_freq float32 [rotary_dim / 2]."""
    t, hq, d = q.shape
    _lib().hallm_rotary(
        q.data_ptr(), q.stride(0), hq, k.data_ptr(), k.stride(0), k.shape[1], d, inv_freq.shape[0],
        positions.data_ptr(), inv_freq.data_ptr(), float(scaling), t, _dtype(q), torch.get_num_threads(),
    )  # fmt: skip


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] -> silu(gate) * up [T, I]."""
    gu = _rows(gate_up)
    t, two_i = gu.shape
    out = torch.empty((t, two_i // 2), dtype=gu.dtype)
    _lib().hallm_silu_and_mul(
        gu.data_ptr(), gu.stride(0), out.data_ptr(), t, two_i // 2, _dtype(gu), torch.get_num_threads()
    )
    return out.view(*gate_up.shape[:-1], two_i // 2)


def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write key/value at `slot_mapping`, then causal attention over the paged cache into `out`.

    query, out [T, Hq, D]; key, value [T, Hk, D] (heads D apart, tokens may be strided); kv_cache
    [2, num_blocks, block_size, Hk, D] contiguous; slot_mapping int64 [T]; query_start_loc int32
    [R + 1]; context_lens int32 [R]; block_tables int32 [R, max_blocks] (rows contiguous);
    sinks None or [Hq] sink logits (see `hallm.platforms.AttentionSpec.sinks`)."""
    t, hq, d = query.shape
    if sinks is not None:
        if tuple(sinks.shape) != (hq,):
            raise ValueError(f"sinks must be [num_heads={hq}], got {tuple(sinks.shape)}")
        sinks = sinks.to(device="cpu", dtype=torch.float32).contiguous()
    _, num_blocks, block_size, hk, _ = kv_cache.shape
    _lib().hallm_paged_attention(
        query.data_ptr(), query.stride(0), key.data_ptr(), key.stride(0), value.data_ptr(), value.stride(0),
        kv_cache.data_ptr(), num_blocks, slot_mapping.data_ptr(),
        query_start_loc.data_ptr(), context_lens.data_ptr(), context_lens.shape[0],
        block_tables.data_ptr(), block_tables.stride(0),
        out.data_ptr(), t, hq, hk, d, block_size,
        float(scale), float(soft_cap or 0.0), int(sliding_window or 0),
        sinks.data_ptr() if sinks is not None else None, _dtype(query), torch.get_num_threads(),
    )  # fmt: skip
    return out
