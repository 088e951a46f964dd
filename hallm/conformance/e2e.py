"""L2 and L3 helpers: engine settings for a device, the executor lifecycle, the greedy rule.

The executor is driven through its contract (start, available_kv_cache_bytes,
kv_cache_bytes_per_block, init_kv_cache, execute, check_health, shutdown) with the core's own
scheduler producing the steps, exactly as `LLMEngine` does. End to end runs go through
`hallm.LLM`. The greedy comparison (docs/writing-a-plugin.md, "Tolerances"): tokens must match the CPU
plugin's float32 run; where they differ, the reference's top-2 logprob gap at that step must be
below a small tolerance (random tiny models have flat spots), and the device's token must be
the reference's runner-up; after such a divergence the two sequences are no longer comparable.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from hallm.conformance.cases import preferred_block_size, preferred_head_size

if TYPE_CHECKING:
    from hallm.conformance.target import Target

#: Per dtype: (top-2 gap below which a different greedy token is accepted, logprob tolerance of
#: the tokens both runs chose). The reference is the CPU plugin in float32.
GREEDY_TOLERANCE = {"float32": (0.02, 0.02), "float16": (0.1, 0.1), "bfloat16": (0.25, 0.25)}
#: Engine settings of every L2/L3 run: small budgets so prefill is chunked and blocks fill up.
ENGINE_SETTINGS: dict[str, Any] = dict(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=32, seed=0)
#: Prompts (token ids) of the L3 runs: short, block-spanning, one sharing a 32-token prefix with
#: another (the prefix cache), and a single token.
PROMPTS: tuple[tuple[int, ...], ...] = (
    tuple(range(10, 17)),
    tuple((7 * i) % 500 + 3 for i in range(40)),
    tuple((7 * i) % 500 + 3 for i in range(32)) + tuple(range(100, 118)),
    (42,),
)
MAX_TOKENS = 12


def engine_shape(target: Target, dtype: str) -> tuple[int, int]:
    """(head size, block size) for the tiny model: what the device's first backend for `dtype` serves."""
    for backend in target.backends():
        if dtype in backend.dtypes:
            return preferred_head_size(backend), preferred_block_size(backend)
    pytest.skip(f"not applicable: no attention backend of {target.origin} declares dtype {dtype}")


# ---- L2: the executor lifecycle -----------------------------------------------------------------


def run_lifecycle(target: Target, executor_cls: type, model_dir: str, dtype: str, block_size: int) -> None:
    """Drive one executor through its whole contract; fail naming the step that broke."""
    from hallm.core.engine_args import EngineArgs
    from hallm.core.request import Request
    from hallm.core.sampling_params import SamplingParams
    from hallm.core.scheduler import Scheduler

    name = getattr(executor_cls, "name", executor_cls.__name__)
    args = EngineArgs(
        model=model_dir, device=target.device_id, dtype=dtype, block_size=block_size, **ENGINE_SETTINGS
    )
    config = args.create_engine_config()
    executor = executor_cls(config, target.platform_cls())  # type: ignore[misc]

    def step_fail(what: str) -> NoReturn:
        pytest.fail(f"executor '{name}' on {target.origin}, dtype {dtype}: {what}", pytrace=False)

    executor.start()
    available = executor.available_kv_cache_bytes()
    if not isinstance(available, int) or available <= 0:
        step_fail(f"available_kv_cache_bytes() after start() returned {available!r}; it must be an int > 0")
    per_block = executor.kv_cache_bytes_per_block()
    if not isinstance(per_block, int) or per_block <= 0:
        step_fail(f"kv_cache_bytes_per_block() returned {per_block!r}; it must be an int > 0")
    num_blocks = min(available // per_block, 64)
    if num_blocks < 8:
        step_fail(f"only {num_blocks} KV blocks fit in {available} bytes ({per_block} per block)")
    config.cache.num_blocks = num_blocks
    executor.init_kv_cache(num_blocks)
    scheduler = Scheduler(config.scheduler, config.cache, config.model.max_model_len)
    vocab = int(config.model.hf_config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS[:3]):
        scheduler.add_request(Request(f"r{i}", list(prompt), params, frozenset(), config.model.max_model_len))
    produced: dict[str, list[int]] = {}
    for _ in range(200):
        if not scheduler.has_unfinished_requests():
            break
        step = scheduler.schedule()
        output = executor.execute(step)
        sampled = getattr(output, "sampled_token_ids", None)
        if not isinstance(sampled, dict):
            step_fail(f"execute() returned {type(output).__name__} without a sampled_token_ids dict")
        for req_id, token in sampled.items():
            if req_id not in step.num_scheduled_tokens or not (isinstance(token, int) and 0 <= token < vocab):
                step_fail(
                    f"execute() sampled {token!r} for {req_id!r}: not a scheduled request's token id in [0, {vocab})"
                )
            produced.setdefault(req_id, []).append(token)
        scheduler.update(step, output)
    else:
        step_fail("the requests did not finish within 200 steps")
    counts = {f"r{i}": len(produced.get(f"r{i}", [])) for i in range(3)}
    if any(n != 4 for n in counts.values()):
        step_fail(f"each request asked for 4 tokens; execute() produced {counts}")
    executor.check_health()
    executor.shutdown()
    executor.shutdown()  # the contract: safe to call twice


# ---- L3: greedy tokens against the CPU plugin -------------------------------------------------------


@dataclasses.dataclass
class Generation:
    """Greedy tokens of each prompt and, per step, {token id: logprob} of the top candidates."""

    tokens: list[list[int]]
    logprobs: list[list[dict[int, float]]]


def generate(device: str, model_dir: str, dtype: str, block_size: int) -> Generation:
    """Greedy generation of PROMPTS on `device` through `hallm.LLM`."""
    from hallm import LLM, SamplingParams

    llm = LLM(model=model_dir, device=device, dtype=dtype, block_size=block_size, **ENGINE_SETTINGS)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=2, ignore_eos=True)
        outputs = llm.generate([list(p) for p in PROMPTS], params, use_tqdm=False)
    finally:
        llm.engine.shutdown()
    tokens, logprobs = [], []
    for out in outputs:
        completion = out.outputs[0]
        tokens.append(list(completion.token_ids))
        logprobs.append([{t: lp.logprob for t, lp in pos.items()} for pos in completion.logprobs or []])
    return Generation(tokens, logprobs)


def compare_greedy(reference: Generation, got: Generation, dtype: str) -> tuple[list[str], list[str]]:
    """(problems, accepted divergences) of `got` against the CPU reference."""
    gap_tol, lp_tol = GREEDY_TOLERANCE.get(dtype, GREEDY_TOLERANCE["bfloat16"])
    problems: list[str] = []
    notes: list[str] = []
    for i, (ref, dut) in enumerate(zip(reference.tokens, got.tokens, strict=True)):
        if len(dut) != len(ref):
            problems.append(f"prompt {i}: {len(dut)} tokens generated, the reference has {len(ref)}")
            continue
        for j, (r, d) in enumerate(zip(ref, dut, strict=True)):
            ranked = sorted(reference.logprobs[i][j].items(), key=lambda kv: -kv[1])
            gap = ranked[0][1] - ranked[1][1] if len(ranked) > 1 else float("inf")
            if r == d:
                lp_ref, lp_dut = reference.logprobs[i][j][r], got.logprobs[i][j].get(d)
                if lp_dut is None or abs(lp_dut - lp_ref) > lp_tol:
                    problems.append(
                        f"prompt {i} step {j}: same token {r} but logprob {lp_dut} vs the reference's "
                        f"{lp_ref:.4f} (tolerance {lp_tol})"
                    )
                    break
                continue
            runner_up = ranked[1][0] if len(ranked) > 1 else None
            if gap <= gap_tol and d == runner_up:
                notes.append(
                    f"prompt {i} diverged at step {j} within tolerance (reference top-2 gap {gap:.4f})"
                )
            else:
                why = (
                    f"its top-2 gap {gap:.4f} exceeds the tolerance {gap_tol}"
                    if gap > gap_tol
                    else f"the device's token is not its runner-up {runner_up}"
                )
                problems.append(
                    f"prompt {i} step {j}: the device chose token {d}, the CPU reference {r} ({why}); "
                    f"tokens so far {dut[: j + 1]} vs {ref[: j + 1]}"
                )
            break  # after any divergence the sequences are no longer comparable
    return problems, notes
