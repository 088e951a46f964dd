"""Compile (not run) every kernel variant for a GPU target: CI's proof that the kernels build,
for NVIDIA (sm_80, sm_90: hallm-cuda) and AMD (gfx90a, gfx942: hallm-rocm).

`compile_variants(arch)` runs Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with
the ptxas in the triton wheel, or AMDGCN -> hsaco) for the variants the launchers in
`hallm.ops.triton.attention` and `kv_write` produce: the KV write, decode (plain and split-KV), prefill, the
split-KV reduction, with and without sliding window and soft cap, for each dtype; the fused
layer kernels, the skinny GEMM and the fused-MoE GEMMs. On sm_90+ the kernels compile with programmatic dependent
launch (`USE_PDL`), as `runtime.pdl_launch` launches them there; never for AMD, whose
`TritonTarget` has no PDL. Each variant has the launch parameters the plugin would pick on a
representative GPU of the architecture (`compile_target`: threads per program in warps of 32 or
64-wide wavefronts, split-K and split-KV from its SM or CU count). It needs no GPU and no driver. Each result carries the kernel's shared-memory use and register count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
import triton

from hallm.ops.triton import fused_moe, moe_compile, sampling, skinny_gemm, skinny_launch
from hallm.ops.triton.attention import jit_kernels
from hallm.ops.triton.launch_config import SPLIT_KV_SEGMENTS, attention_constexprs, head_pad, kernel_config
from hallm.ops.triton.skinny_launch import CompileVariant
from hallm.ops.triton.target import (
    AMD_ARCHS,
    GENERIC,
    NVIDIA_SHARED_MEMORY,
    TUNED_SMS,
    TritonTarget,
    amd_target,
)

_SIG_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
#: Largest dynamic shared memory a block may use on the smallest target we support (sm_86/89).
SHARED_MEMORY_LIMIT = NVIDIA_SHARED_MEMORY
#: Local data share (LDS) a workgroup may use on gfx90a and gfx942.
AMD_SHARED_MEMORY_LIMIT = 64 * 1024
#: Compute units of the GPU each AMD architecture is compiled for (an MI250X die, an MI300X):
#: launch shapes (split-K, split-KV) follow from them as hallm-rocm's would on that GPU.
AMD_COMPILE_CUS = {"gfx90a": 110, "gfx942": 304}
#: SMs of the GPU each NVIDIA capability is compiled for (an A100, an H100/H200).
NVIDIA_COMPILE_SMS = {80: 108, 90: 132}


def compile_target(arch: int | str) -> TritonTarget:
    """The launch target a compile check builds for: an NVIDIA capability (80, 90) or an AMD
    architecture ("gfx90a", "gfx942"), as hallm-cuda / hallm-rocm would describe that GPU."""
    if str(arch) in AMD_ARCHS:
        return amd_target(str(arch), AMD_COMPILE_CUS[str(arch)])
    cap = int(arch)
    return TritonTarget(num_sms=NVIDIA_COMPILE_SMS.get(cap, TUNED_SMS), pdl=cap >= 90)


def shared_memory_limit(target: str) -> int:
    """The shared-memory limit of a result's target ("cuda:90", "hip:gfx942")."""
    return AMD_SHARED_MEMORY_LIMIT if target.startswith("hip:") else SHARED_MEMORY_LIMIT


@dataclasses.dataclass(frozen=True)
class Compiled:
    name: str
    target: str
    shared: int  # bytes of shared memory
    registers: int | None  # per thread, when the backend reports it
    spills: int | None


def _target(backend: str, arch: int | str, warp_size: int) -> Any:
    from triton.backends.compiler import GPUTarget

    return GPUTarget(backend, arch, warp_size)


def _compile(
    fn: Any,
    signature: dict[str, str],
    constexprs: dict[str, Any],
    target: Any,
    aligned: Iterable[str] = (),
    **options: Any,
) -> Any:
    """Compile like a launch would: pointers 16-byte aligned (torch's allocations are) and the
    int arguments named in `aligned` multiples of 16, the specializations a real launch makes."""
    import inspect

    from triton.compiler import ASTSource

    constexprs = dict(constexprs)
    params = inspect.signature(getattr(fn, "fn", fn)).parameters
    if "USE_PDL" in params and "USE_PDL" not in constexprs:
        # grid dependency control is PTX for sm_90+: what pdl_launch turns on there
        constexprs["USE_PDL"] = target.backend == "cuda" and int(target.arch) >= 90
    for name, param in params.items():  # other defaulted constexprs at their defaults
        if name not in signature and name not in constexprs and param.default is not inspect.Parameter.empty:
            constexprs[name] = param.default
    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    names = list(params)
    divisible = {name for name, t in signature.items() if t.startswith("*")} | set(aligned)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    return triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs), target=target, options=options
    )


def _attention_variant(
    dtype: torch.dtype,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    decode_only: bool,
    split: bool,
    window: bool,
    soft_cap: bool,
    merge_in_kernel: bool = True,
    target: TritonTarget = GENERIC,
) -> tuple[dict[str, str], dict[str, Any], dict[str, int]]:
    t = _SIG_DTYPE[dtype]
    q_per_kv = num_heads // num_kv_heads
    cfg = kernel_config(dtype, head_size, q_per_kv, decode_only, target)
    meta = attention_constexprs(
        cfg, q_per_kv, head_size, decode_only, SPLIT_KV_SEGMENTS if split else 1, merge_in_kernel
    )
    signature = {
        "out_ptr": f"*{t}",
        "q_ptr": f"*{t}",
        "k_cache_ptr": f"*{t}",
        "v_cache_ptr": f"*{t}",
        "block_tables_ptr": "*i32",
        "seq_lens_ptr": "*i32",
        "qsl_ptr": "*i32",
        "segm_out_ptr": "*fp32" if split else f"*{t}",
        "segm_max_ptr": "*fp32" if split else f"*{t}",
        "segm_sum_ptr": "*fp32" if split else f"*{t}",
        "counter_ptr": "*i32",
        "num_seqs": "i32",
        "scale": "fp32",
        "soft_cap": "fp32",
        "window": "i32",
        "q_stride_t": "i32",
        "q_stride_h": "i32",
        "out_stride_t": "i32",
        "out_stride_h": "i32",
        "cache_stride_blk": "i64",
        "cache_stride_tok": "i32",
        "cache_stride_h": "i32",
        "bt_stride": "i32",
    }
    constexprs = {
        "NUM_HEADS": num_heads,
        "NUM_Q_PER_KV": q_per_kv,
        "HEAD_SIZE": head_size,
        "BLOCK_SIZE": block_size,
        **meta,
        "USE_SOFT_CAP": soft_cap,
        "USE_WINDOW": window,
        "DOT_F32": dtype == torch.float32,
    }
    return signature, constexprs, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def variants(
    dtypes: Iterable[torch.dtype] = (torch.bfloat16, torch.float16, torch.float32),
    shapes: Iterable[tuple[int, int, int]] = ((14, 2, 64), (32, 8, 128)),
    block_size: int = 16,
    target: TritonTarget = GENERIC,
) -> list[CompileVariant]:
    """(name, kernel, signature, constexprs, options) for every variant the launchers use,
    with the launch parameters they use on `target`.

    shapes: (num_heads, num_kv_heads, head_size), by default Qwen2.5-0.5B's and Llama-3-8B's.
    """
    k = jit_kernels()
    out = []
    for dtype in dtypes:
        t = _SIG_DTYPE[dtype]
        for num_heads, num_kv_heads, head_size in shapes:
            tag = f"{t}-h{num_heads}/{num_kv_heads}-d{head_size}"
            out.append(
                (
                    f"write_kv-{tag}",
                    k.write_kv,
                    {
                        "key_ptr": f"*{t}",
                        "value_ptr": f"*{t}",
                        "k_cache_ptr": f"*{t}",
                        "v_cache_ptr": f"*{t}",
                        "slot_ptr": "*i64",
                        "key_stride_t": "i32",
                        "key_stride_h": "i32",
                        "value_stride_t": "i32",
                        "value_stride_h": "i32",
                        "cache_stride_slot": "i32",
                        "cache_stride_h": "i32",
                    },
                    {
                        "NUM_KV_HEADS": num_kv_heads,
                        "HEAD_SIZE": head_size,
                        "BLOCK_HD": triton.next_power_of_2(num_kv_heads * head_size),
                    },
                    {"num_warps": target.warps(128 if num_kv_heads * head_size >= 512 else 32)},
                )
            )
            for name, decode_only, split, merge in (
                ("decode", True, False, False),
                ("decode-split", True, True, True),
                ("decode-split-reduce", True, True, False),
                ("prefill", False, False, False),
            ):
                sig, ce, opts = _attention_variant(
                    dtype,
                    num_heads,
                    num_kv_heads,
                    head_size,
                    block_size,
                    decode_only,
                    split,
                    False,
                    False,
                    merge,
                    target,
                )
                out.append((f"attention-{name}-{tag}", k.attention, sig, ce, opts))
            sig, ce, opts = _attention_variant(
                dtype, num_heads, num_kv_heads, head_size, block_size, False, False, True, True, True, target
            )
            out.append((f"attention-prefill-window-softcap-{tag}", k.attention, sig, ce, opts))
            out.append(
                (
                    f"reduce-{tag}",
                    k.reduce,
                    {
                        "out_ptr": f"*{t}",
                        "segm_out_ptr": "*fp32",
                        "segm_max_ptr": "*fp32",
                        "segm_sum_ptr": "*fp32",
                        "qsl_ptr": "*i32",
                        "num_seqs": "i32",
                        "out_stride_t": "i32",
                        "out_stride_h": "i32",
                    },
                    {
                        "NUM_HEADS": num_heads,
                        "HEAD_SIZE": head_size,
                        "HEAD_PAD": head_pad(head_size),
                        "NUM_SEGMENTS": SPLIT_KV_SEGMENTS,
                    },
                    {"num_warps": target.warps(128)},
                )
            )
    out.extend(_fused_variants(tuple(dtypes), target))
    out.extend(
        skinny_launch.compile_variants(
            skinny_gemm.jit_kernels().skinny_gemm,
            tuple(_SIG_DTYPE[d] for d in dtypes if d != torch.float32),
            target,
        )
    )
    out.extend(
        moe_compile.compile_variants(fused_moe.jit_kernels(), tuple(_SIG_DTYPE[d] for d in dtypes), target)
    )
    out.extend(sampling.compile_variants(tuple(_SIG_DTYPE[d] for d in dtypes), target))
    return out


def _fused_variants(dtypes: tuple[torch.dtype, ...], target: TritonTarget) -> list[CompileVariant]:
    from hallm.ops.triton import fused

    k = fused.jit_kernels()
    out: list[CompileVariant] = []
    for dtype in dtypes:
        t = _SIG_DTYPE[dtype]
        for hidden in (896, 4096):
            block = triton.next_power_of_2(hidden)
            out.append(
                (
                    f"rms_norm-{t}-{hidden}",
                    k.rms_norm,
                    {
                        "x_ptr": f"*{t}",
                        "res_ptr": f"*{t}",
                        "w_ptr": f"*{t}",
                        "out_ptr": f"*{t}",
                        "res_out_ptr": f"*{t}",
                        "x_stride": "i32",
                        "res_stride": "i32",
                        "out_stride": "i32",
                        "res_out_stride": "i32",
                        "eps": "fp32",
                    },
                    {"N": hidden, "BLOCK": block, "HAS_RESIDUAL": True},
                    {"num_warps": target.warps(min(512, max(32, block // 8)))},
                )
            )
        for hq, hk, d in ((14, 2, 64), (32, 8, 128)):
            out.append(
                (
                    f"rotary-{t}-h{hq}/{hk}-d{d}",
                    k.rotary,
                    {
                        "pos_ptr": "*i64",
                        "inv_freq_ptr": "*fp32",
                        "q_ptr": f"*{t}",
                        "k_ptr": f"*{t}",
                        "q_out_ptr": f"*{t}",
                        "k_out_ptr": f"*{t}",
                        "q_stride_t": "i32",
                        "q_stride_h": "i32",
                        "k_stride_t": "i32",
                        "k_stride_h": "i32",
                        "scaling": "fp32",
                    },
                    {
                        "NUM_Q_HEADS": hq,
                        "NUM_K_HEADS": hk,
                        "HEAD_SIZE": d,
                        "HALF": d // 2,
                        "H_PAD": triton.next_power_of_2(hq),
                        "HALF_PAD": d // 2,
                        "REST_PAD": 0,
                    },
                    {"num_warps": target.warps(128)},
                )
            )
        out.append(
            (
                f"silu_and_mul-{t}",
                k.silu_and_mul,
                {"x_ptr": f"*{t}", "out_ptr": f"*{t}", "x_stride": "i32", "out_stride": "i32", "N": "i32"},
                {"BLOCK": 1024},
                {"num_warps": target.warps(128)},
            )
        )
    return out


#: The CI subset: every code path once (KV write, decode, split-KV merged in the kernel and by
#: the reduce kernel, prefill with window and soft cap, the float32 exact-dot path) at
#: Llama-3-8B's head shape; the skinny GEMM plain, split-K, at 64 rows (its largest shared
#: memory), and with the RMSNorm prologue (with and without the residual) and rotary epilogue;
#: both MoE GEMMs at decode (16-row) and prefill (64-row, their largest shared memory) blocks,
#: and the float32 exact-dot path.
CI_SUBSET = (
    "write_kv-bf16-h32/8-d128",
    "attention-decode-split-bf16-h32/8-d128",
    "attention-decode-split-reduce-bf16-h32/8-d128",
    "reduce-bf16-h32/8-d128",
    "attention-prefill-window-softcap-bf16-h32/8-d128",
    "attention-decode-fp32-h32/8-d128",
    "rms_norm-bf16-4096",
    "rotary-bf16-h32/8-d128",
    "silu_and_mul-bf16",
    "skinny-qkv-bf16-m1",
    "skinny-down-bf16-m1",
    "skinny-down-bf16-m64",
    "skinny-qkv-norm-rotary-bf16-m1",
    "skinny-qkv-norm-rotary-bf16-m64",
    "skinny-qkv-norm-rotary-first-bf16-m1",
    "moe-gate-up-bf16-m16",
    "moe-down-bf16-m16",
    "moe-gate-up-bf16-m64",
    "moe-down-bf16-m64",
    "moe-gate-up-bf16-m64-bias-swiglu",
    "moe-down-bf16-m64-bias-swiglu",
    "moe-gate-up-fp32-m16",
    "race-parts-bf16",
    "race-parts-fp32",
    "race-reduce",
)


def compile_variants(
    arch: int | str = 90,
    only: Iterable[str] | None = None,
    **variant_kwargs: Any,
) -> list[Compiled]:
    """Compile every variant (or those named in `only`) for one GPU (`compile_target(arch)`),
    with the launch parameters the plugin would use on it; raises on the first kernel that does
    not build. Run with TRITON_INTERPRET unset: the interpreter's triton cannot compile."""
    launch = compile_target(arch)
    backend = launch.backend
    gpu = _target(backend, arch if backend == "hip" else int(arch), launch.warp_size)
    wanted = set(only) if only is not None else None
    results = []
    for name, fn, sig, ce, opts in variants(target=launch, **variant_kwargs):
        if wanted is not None and name not in wanted:
            continue
        compiled = _compile(fn, sig, ce, gpu, **opts)
        md = compiled.metadata
        results.append(
            Compiled(
                name=name,
                target=f"{backend}:{arch}",
                shared=int(getattr(md, "shared", 0)),
                registers=getattr(compiled, "n_regs", None),
                spills=getattr(compiled, "n_spills", None),
            )
        )
    return results


def main(argv: list[str]) -> None:
    """python -m hallm.ops.triton.compile_check [--ci] [--json] [--jobs N] [ARCH ...] (default 80 90).

    ARCH: an NVIDIA compute capability (80, 90) or an AMD architecture (gfx90a, gfx942).
    --jobs N: compile in N processes (default 1)."""
    import json
    import time

    ci = "--ci" in argv
    as_json = "--json" in argv
    jobs = 1
    for a in argv:
        if a.startswith("--jobs="):
            jobs = int(a.split("=", 1)[1])
    if jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {jobs}")
    names = [a for a in argv if not a.startswith("--")] or ["80", "90"]
    archs: list[int | str] = [a if a in AMD_ARCHS else int(a) for a in names]
    start = time.perf_counter()
    if jobs > 1:
        from hallm.ops.triton.compile_parallel import compile_parallel

        rows = compile_parallel(archs, ci, jobs)
    else:
        rows = [
            dataclasses.asdict(r)
            for arch in archs
            for r in compile_variants(arch, only=CI_SUBSET if ci else None)
        ]
    if as_json:
        print(json.dumps(rows))
        return
    for r in rows:
        print(f"{r['target']:12} {r['name']:50} shared={r['shared']:6d}")
    print(f"{' '.join(names)}: {time.perf_counter() - start:.1f} s with {jobs} process(es)")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
