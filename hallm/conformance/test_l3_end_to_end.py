"""L3 end to end: greedy generation on the device matches the CPU plugin (the rule: `e2e.py`).

The same tiny random llama and qwen2 checkpoints run through `hallm.LLM` on the CPU plugin in
float32 (the reference, once per session) and on the device in each declared dtype, with
chunked prefill, the prefix cache and several requests per step.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from hallm.conformance.e2e import Generation, compare_greedy, engine_shape, generate
from hallm.conformance.target import Target

pytestmark = [pytest.mark.hallm_level(3), pytest.mark.hallm_group("L3 greedy tokens vs CPU")]


@pytest.fixture(scope="session")
def cpu_reference() -> Callable[[str, int], Generation]:
    """`cpu_reference(model_dir, block_size)` -> the CPU plugin's float32 greedy generation."""
    done: dict[tuple[str, int], Generation] = {}

    def get(model_dir: str, block_size: int) -> Generation:
        if (model_dir, block_size) not in done:
            from hallm.platforms.loading import loaded_platforms, unload_platform

            was_loaded = "cpu" in loaded_platforms()
            done[model_dir, block_size] = generate("cpu", model_dir, "float32", block_size)
            if not was_loaded:
                unload_platform("cpu")  # the device under test runs as it would alone
        return done[model_dir, block_size]

    return get


@pytest.mark.hallm_params("end_to_end")
def test_greedy_matches_cpu(
    request: pytest.FixtureRequest,
    target: Target,
    tiny_model: Callable[[str, int], str],
    cpu_reference: Callable[[str, int], Generation],
    arch: str,
    dtype: str,
) -> None:
    """Same greedy tokens as the CPU plugin, except where the reference's top-2 gap is tiny."""
    head_size, block_size = engine_shape(target, dtype)
    model_dir = tiny_model(arch, head_size)
    reference = cpu_reference(model_dir, block_size)
    got = generate(target.device_id, model_dir, dtype, block_size)
    problems, notes = compare_greedy(reference, got, dtype)
    if notes:  # accepted divergences are kept in the report's message of the passing test
        request.node.user_properties.append(("hallm_note", "; ".join(notes)))
    if problems:
        pytest.fail(
            f"{arch} (head_size {head_size}, block_size {block_size}) in {dtype} on {target.origin} vs the CPU "
            "plugin in float32:\n" + "".join(f"  - {p}\n" for p in problems),
            pytrace=False,
        )
