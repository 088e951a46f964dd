"""The core's attention-backend selection (in process; contributed backends are stubbed)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from hallm.core.attention_selector import select_attention_backend, support_matrix
from hallm.platforms import (
    AttentionBackend,
    AttentionSpec,
    BackendSelectionError,
    Capabilities,
    Platform,
    Probe,
    contributions,
)


class _Backend(AttentionBackend):
    name = "base"

    def forward(self, query: Any, key: Any, value: Any, kv_cache: Any, metadata: Any, out: Any) -> Any:
        return out


class Head64Only(_Backend):
    name = "head64"
    head_sizes = frozenset({64})


class Bf16Only(_Backend):
    name = "bf16"
    dtypes = frozenset({"bfloat16"})


class AnyFloat32(_Backend):
    name = "any32"


class Contributed(_Backend):
    name = "contributed"
    block_sizes = frozenset({32})


class SelectorPlatform(Platform):
    name = "selector-test"
    device_type = "cpu"
    api_version = "1.0"
    backends: Sequence[type[AttentionBackend]] = (Head64Only, Bf16Only, AnyFloat32)

    @classmethod
    def probe(cls) -> Probe:
        return Probe(True, "test", 1)

    def capabilities(self) -> Capabilities:
        return Capabilities(dtypes=("float32",))

    def attention_backends(self) -> Sequence[type[AttentionBackend]]:
        return self.backends

    def memory_info(self, device_index: int = 0) -> tuple[int, int]:
        return (0, 0)


@pytest.fixture(autouse=True)
def _only_stub_contributions(monkeypatch: pytest.MonkeyPatch) -> None:
    # Keep installed extensions out of these tests: exactly one contributed backend.
    monkeypatch.setattr(contributions, "contributed_attention_backends", lambda platform: [Contributed])


def spec(**overrides: Any) -> AttentionSpec:
    fields: dict[str, Any] = {
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_size": 32,
        "scale": 0.1,
        "dtype": "float32",
    }
    return AttentionSpec(**{**fields, **overrides})


def test_first_valid_candidate_in_platform_order_is_chosen() -> None:
    platform = SelectorPlatform()
    assert select_attention_backend(platform, spec()) is AnyFloat32
    assert select_attention_backend(platform, spec(head_size=64)) is Head64Only
    assert select_attention_backend(platform, spec(dtype="bfloat16")) is Bf16Only


def test_contributed_backends_come_after_the_platforms_own() -> None:
    platform = SelectorPlatform()
    assert [row["name"] for row in support_matrix(platform)] == ["head64", "bf16", "any32", "contributed"]
    assert select_attention_backend(platform, spec(block_size=32), requested="contributed") is Contributed


def test_requested_unknown_backend_lists_the_available_ones() -> None:
    with pytest.raises(BackendSelectionError) as exc:
        select_attention_backend(SelectorPlatform(), spec(), requested="flash")
    message = str(exc.value)
    assert "attention backend 'flash' is not available on device 'selector-test'" in message
    assert "available: head64, bf16, any32, contributed" in message


def test_requested_backend_that_cannot_serve_gives_its_reasons() -> None:
    with pytest.raises(BackendSelectionError) as exc:
        select_attention_backend(SelectorPlatform(), spec(), requested="head64")
    assert "attention backend 'head64'" in str(exc.value)
    assert "head size 32 not in [64]" in str(exc.value)


def test_no_valid_backend_lists_every_candidate_with_its_reasons() -> None:
    with pytest.raises(BackendSelectionError) as exc:
        select_attention_backend(SelectorPlatform(), spec(dtype="float16", sliding_window=128))
    lines = str(exc.value).splitlines()
    assert "no attention backend on device 'selector-test' can serve" in lines[0]
    assert "dtype=float16" in lines[0] and "features=['sliding_window']" in lines[0]
    reasons = {line.split(":")[0].strip(): line for line in lines[1:5]}
    assert set(reasons) == {"head64", "bf16", "any32", "contributed"}
    assert "head size 32 not in [64]" in reasons["head64"]
    assert "dtype float16 not in ['bfloat16']" in reasons["bf16"]
    assert "features ['sliding_window'] not supported" in reasons["any32"]
    assert "block size 16 not in [32]" in reasons["contributed"]


def test_two_candidates_with_one_name_are_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    class Impostor(_Backend):
        name = "any32"

    monkeypatch.setattr(contributions, "contributed_attention_backends", lambda platform: [Impostor])
    with pytest.raises(Exception, match="named 'any32'"):
        select_attention_backend(SelectorPlatform(), spec())


def test_attention_backend_name_is_required_at_class_definition() -> None:
    with pytest.raises(TypeError, match=r"Nameless must set the class attribute `name`"):

        class Nameless(AttentionBackend):
            def forward(
                self, query: Any, key: Any, value: Any, kv_cache: Any, metadata: Any, out: Any
            ) -> Any:
                return out

    class AbstractBase(AttentionBackend):  # no forward: an intermediate base, not checked
        pass

    class Named(AbstractBase):
        name = "named"

        def forward(self, query: Any, key: Any, value: Any, kv_cache: Any, metadata: Any, out: Any) -> Any:
            return out

    assert Named.name == "named"
