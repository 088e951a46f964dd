"""Precision over long sums: near-uniform attention over 512, 2048 and 8192 keys.

With keys shrunk so that every score is about equal and values spread around 1, the output is
about 1 whatever the length, and a kernel that accumulates in 16-bit precision (a bf16 running
sum of P.V, tile-wise bf16 partial sums) loses more with every tile added: its error grows with
the number of keys. A correct kernel (float32 accumulators, one rounding to the output dtype at
the end) stays within about one unit in the last place of the output dtype at 1.0, at any
length. The ordinary tolerances of the matrix are too loose to see this.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from hallm.conformance.alternatives import explain_alternatives
from hallm.conformance.diagnose import describe_request
from hallm.conformance.kernels import AttentionCase, Ran, check_case
from hallm.ops.testing import expected_attention

#: Absolute tolerance on outputs of about 1: a little over one unit in the last place of the
#: dtype at 1.0 (bf16 2^-7, fp16 2^-10); float32 leaves room for TF32 products.
PRECISION_TOLERANCE = {"float32": 1e-3, "float16": 2e-3, "bfloat16": 1e-2}
#: An error that at least doubles from the shortest to the longest request "grows with length".
GROWTH = 2.0


def check_precision(case: AttentionCase, ran: Ran) -> None:
    """Fail unless every request is within `PRECISION_TOLERANCE`, naming the cause: a wrong
    attention (`hallm.conformance.alternatives`), else error that grows with length or not."""
    tol = PRECISION_TOLERANCE.get(case.dtype, PRECISION_TOLERANCE["bfloat16"])
    expected = expected_attention(ran.batch, case.softmax_scale, case.sliding_window, case.logits_soft_cap)
    got = ran.out.cpu().double()
    lay = ran.batch.layout
    per_req: list[tuple[int, float]] = []
    for i in range(lay.num_reqs):
        lo, hi = int(lay.query_start_loc[i]), int(lay.query_start_loc[i + 1])
        err = (got[lo:hi] - expected[lo:hi]).abs()
        per_req.append(
            (int(lay.seq_lens[i]), float(err.max()) if bool(torch.isfinite(err).all()) else float("inf"))
        )
    worst = max(e for _, e in per_req)
    if worst <= tol:
        return
    per_req.sort()
    by_len = dict(per_req)
    table = ", ".join(f"{n} keys: {e:.3g}" for n, e in per_req)
    errors = [e for _, e in per_req]
    growing = all(b >= a for a, b in itertools.pairwise(errors)) and errors[-1] >= GROWTH * max(
        errors[0], tol / 4
    )
    other = explain_alternatives(
        ran.batch,
        got,
        case.softmax_scale,
        tol,
        [i for i in range(lay.num_reqs) if by_len[int(lay.seq_lens[i])] > tol],
        case.sliding_window,
        case.logits_soft_cap,
    )
    if other is not None:
        cause = other
    elif growing:
        cause = (
            "the error grows with the number of keys: the kernel accumulates in low precision. Keep the "
            "softmax's running max and sum and the P.V accumulator in float32 and round to "
            f"{case.dtype} once, at the end (a {case.dtype} running sum, even of float32 tile sums, "
            "loses a little more with every tile)"
        )
    else:
        # Not a precision problem: the ordinary check and its diagnoses say more, if it fails.
        check_case(case, ran)
        cause = (
            "the error does not grow with the number of keys, so it is not accumulation: look at the "
            "rounding of the output or of the softmax probabilities"
        )
    worst_req = max(range(lay.num_reqs), key=lambda i: by_len[int(lay.seq_lens[i])])
    pytest.fail(
        f"long near-uniform attention in {case.dtype} is off by up to {worst:.3g} (tolerance {tol:g}, outputs "
        f"about 1): max error by length: {table}; worst: {describe_request(ran.batch, worst_req)}.\n"
        f"  - {cause}\n  case: {case.describe()}",
        pytrace=False,
    )
