"""benchmarks/decode_gemm_variant.py, the `decode-gemm` engine variant, in the Triton interpreter:
it reads the newest tuning record, routes each call by its rows and the record (skinny GEMM,
decode GEMM with the tuned configuration, cuBLAS where the record says cuBLAS is faster), and
every route computes F.linear."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from benchmarks.decode_gemm_variant import DecodeGemmLinear, Measured, load_tuning, plan_for
from hallm.ops.triton import decode_gemm
from hallm.ops.triton.decode_gemm import DecodeGemmConfig, decode_gemm_config
from hallm.ops.triton.target import TritonTarget
from hallm.platforms.ops import LinearWeights

H100 = TritonTarget(num_sms=132, pdl=False, shared_memory_bytes=227 * 1024)
FAST = dict(block_n=16, block_k=32, block_m=32, num_warps=4, num_stages=5)


def _entry(us: float, **config: Any) -> dict[str, Any]:
    return {**dataclasses.asdict(DecodeGemmConfig(**config)), "config": "label", "us": us}


def _row(n: int, k: int, m: int, cublas_us: float, configs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"n": n, "k": k, "m": m, "cublas_us": cublas_us, "configs": configs}


def test_the_newest_record_and_its_fastest_right_configuration(tmp_path: Path) -> None:
    old = {"rows": [_row(48, 64, 192, 1.0, [_entry(0.5, block_n=64)])]}
    new = {
        "rows": [
            _row(
                48,
                64,
                192,
                10.0,
                [
                    _entry(8.0, block_n=64),
                    {**_entry(1.0, block_n=256), "wrong": "max error 3.0"},  # fastest, but wrong
                    _entry(5.0, **FAST),
                    {**dataclasses.asdict(DecodeGemmConfig(block_n=128)), "error": "no compile"},
                ],
            ),
            _row(48, 64, 128, 4.0, [_entry(5.0, block_n=64)]),
        ]
    }
    record = tmp_path / "decode-gemm.jsonl"
    record.write_text(json.dumps(old) + "\n" + json.dumps(new) + "\n")
    tuning = load_tuning([tmp_path / "absent.jsonl", record])
    assert set(tuning) == {(48, 64)}
    by_rows = {m.rows: m for m in tuning[48, 64]}
    assert by_rows[192].config == DecodeGemmConfig(**FAST)
    assert by_rows[192].cublas_over_best == pytest.approx(2.0)
    assert by_rows[128].cublas_over_best == pytest.approx(0.8)
    assert load_tuning([tmp_path / "absent.jsonl"]) == {}


def test_plans_follow_the_nearest_measured_rows() -> None:
    tuned = DecodeGemmConfig(block_n=128, block_k=64, num_warps=8, num_stages=5)
    tuning = {
        (4096, 4096): [Measured(192, tuned, 1.3), Measured(128, tuned, 0.9)],
    }
    # nearest is 192, where the decode GEMM won: its configuration, stages cut to the rows'
    assert plan_for(192, 4096, 4096, tuning, H100) == tuned  # 5 stages of 40 KB fit
    assert plan_for(256, 4096, 4096, tuning, H100) == dataclasses.replace(tuned, num_stages=4)  # of 48 KB
    # nearest is 128, where cuBLAS won
    assert plan_for(100, 4096, 4096, tuning, H100) is None
    # a shape the record lacks: the shipped configuration
    assert plan_for(64, 1024, 4096, tuning, H100) == decode_gemm_config(64, 1024, 4096, H100)


def test_each_route_computes_f_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    n, k = 48, 64
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(torch.bfloat16)
    b = torch.randn(n, generator=gen).to(torch.bfloat16)
    # decode GEMM wins at 32 rows, cuBLAS at 128 (nearest for 100 rows)
    tuning = {(n, k): [Measured(32, DecodeGemmConfig(**FAST), 2.0), Measured(128, DecodeGemmConfig(), 0.5)]}
    kernel = DecodeGemmLinear(LinearWeights(w, b), H100, tuning)
    assert kernel.skinny is not None
    decoded = []
    real = decode_gemm.decode_linear

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        decoded.append(kwargs["config"])
        return real(*args, **kwargs)

    monkeypatch.setattr(decode_gemm, "decode_linear", spy)
    for rows, route in [(4, "skinny"), (24, "decode"), (100, "cublas"), (300, "cublas")]:
        x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
        before = len(decoded)
        got = kernel(x.view(1, rows, k)).view(rows, n)
        want = F.linear(x.float(), w.float(), b.float())
        torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=2e-2, msg=f"{rows} rows ({route})")
        assert (len(decoded) > before) == (route == "decode"), f"{rows} rows took the wrong route"
    assert decoded == [DecodeGemmConfig(**FAST)]
