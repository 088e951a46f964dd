"""Every in-tree platform plugin, exercised only through the public contracts (hallm.platforms).

The plugin is loaded by device id the way the engine loads it; each test then uses nothing but
the Platform / AttentionBackend API and checks attention against `hallm.ops.reference`.
"""

from __future__ import annotations

import pytest
import torch

from hallm.ops.testing import cache_slot_view, expected_attention, make_paged_batch
from hallm.platforms import (
    API_VERSION,
    DTYPE_NAMES,
    KNOWN_FEATURES,
    AttentionBackend,
    AttentionSpec,
    Capabilities,
    Platform,
    Probe,
)

DEVICE_IDS = ["cpu", "template"]

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOLERANCE = {"float32": 2e-5, "bfloat16": 2e-2, "float16": 2e-3}

# (context_len, query_len): fresh prefill, decode, chunked prefill, decode, short multi-token step.
MIXED = [(0, 11), (19, 1), (13, 10), (4, 1), (26, 3)]


def load(device_id: str) -> type[Platform]:
    """The Platform class of `device_id`, loaded through the registry like the engine does."""
    try:
        from hallm.platforms.registry import load_platform
    except ImportError:  # registry not there yet: the entry point, by hand
        from importlib.metadata import entry_points

        import pluggy

        from hallm.platforms import HallmHookSpecs

        (ep,) = entry_points(group="hallm.platforms", name=device_id)
        pm = pluggy.PluginManager("hallm")
        pm.add_hookspecs(HallmHookSpecs)
        pm.register(ep.load())
        pm.check_pending()
        return pm.hook.hallm_platform()  # type: ignore[no-any-return]
    return load_platform(device_id)


@pytest.fixture(params=DEVICE_IDS)
def platform_cls(request: pytest.FixtureRequest) -> type[Platform]:
    cls = load(request.param)
    probe = cls.probe()
    if not probe.available:
        pytest.skip(f"{request.param} unavailable here: {probe.reason}")
    return cls


@pytest.fixture
def platform(platform_cls: type[Platform]) -> Platform:
    return platform_cls()


def test_identity(platform_cls, request):
    assert issubclass(platform_cls, Platform)
    assert platform_cls.name == request.node.callspec.params["platform_cls"]
    assert platform_cls.device_type and platform_cls.dist_backend
    assert platform_cls.api_version.split(".")[0] == API_VERSION.split(".")[0]
    described = platform_cls().describe()
    assert described["name"] == platform_cls.name and described["api_version"] == platform_cls.api_version


def test_probe(platform_cls):
    probe = platform_cls.probe()
    assert isinstance(probe, Probe)
    assert probe.available and probe.device_count >= 1
    assert probe.reason.strip()
    assert platform_cls.probe() == probe  # cheap and side-effect free: same answer twice


def test_capabilities(platform):
    caps = platform.capabilities()
    assert isinstance(caps, Capabilities)
    assert caps.dtypes and set(caps.dtypes) <= set(DTYPE_NAMES)
    assert "auto" in caps.kv_cache_dtypes
    assert caps.max_world_size is None or caps.max_world_size >= 1


def test_memory_info(platform):
    free, total = platform.memory_info(0)
    assert isinstance(free, int) and isinstance(total, int)
    assert 0 < free <= total


def test_device_runtime_defaults_work(platform):
    device = platform.device(0)
    assert device.type == platform.device_type
    assert platform.device_name(0)
    platform.set_device(0)
    platform.manual_seed(0)
    platform.synchronize()
    platform.empty_cache()


def test_attention_backends_declare_and_validate(platform):
    backends = list(platform.attention_backends())
    assert backends, "a platform needs at least one attention backend"
    dtypes = platform.capabilities().dtypes
    for backend in backends:
        assert issubclass(backend, AttentionBackend) and backend.name
        assert backend.features <= KNOWN_FEATURES
        assert backend.dtypes & set(dtypes), f"{backend.name} serves none of the platform's dtypes"
        assert backend.validate(_supported_spec(backend, dtypes)) == []

        bogus = _supported_spec(backend, dtypes, kv_cache_dtype="no_such_cache_dtype")
        reasons = backend.validate(bogus)
        assert reasons and any("no_such_cache_dtype" in r for r in reasons)
        for dtype in set(DTYPE_NAMES) - backend.dtypes:
            reasons = backend.validate(_supported_spec(backend, dtypes, dtype=dtype))
            assert any(dtype in r for r in reasons), f"{backend.name} accepted unsupported {dtype}"


def _cases(device_id: str) -> list[object]:
    """(device id, backend name, dtype, features) for every backend x dtype a plugin declares."""
    try:
        platform = load(device_id)()
        dtypes = platform.capabilities().dtypes
    except Exception:  # reported by the test itself, not as a collection error of the module
        return [pytest.param(device_id, None, None, False, id=f"{device_id}-load-error")]
    cases: list[object] = []
    for backend in platform.attention_backends():
        for dtype in dtypes:
            if dtype in backend.dtypes:
                cases.append((device_id, backend.name, dtype, False))
                if backend.features:
                    cases.append((device_id, backend.name, dtype, True))
    return cases


@pytest.mark.parametrize(
    ("device_id", "backend_name", "dtype", "features"),
    [case for device_id in DEVICE_IDS for case in _cases(device_id)],
    ids=lambda v: {True: "features", False: "plain"}.get(v, v) if isinstance(v, bool) else str(v),
)
def test_forward_matches_reference(device_id, backend_name, dtype, features):
    """Mixed batch, shuffled block tables, NaN in every unused slot: same answer as the oracle."""
    platform = load(device_id)()  # raises here for a plugin that failed at collection
    (backend,) = [b for b in platform.attention_backends() if b.name == backend_name]
    num_heads, num_kv_heads, block_size = 8, 2, _block_size(backend)
    head_size = _head_size(backend)
    window = 7 if features and "sliding_window" in backend.features else None
    soft_cap = 4.0 if features and "soft_cap" in backend.features else None
    scale = head_size**-0.5 * (4 if soft_cap else 1)  # larger logits, so a soft cap bites
    spec = AttentionSpec(
        num_heads,
        num_kv_heads,
        head_size,
        scale,
        dtype,
        block_size=block_size,
        sliding_window=window,
        logits_soft_cap=soft_cap,
    )
    assert backend.validate(spec) == []
    shape = backend.kv_cache_shape(8, block_size, num_kv_heads, head_size)
    if shape != (2, 8, block_size, num_kv_heads, head_size):
        pytest.skip(f"{backend_name} uses its own cache layout {shape}: see the conformance kit")

    context_lens, query_lens = zip(*MIXED, strict=True)
    batch = make_paged_batch(
        list(query_lens),
        list(context_lens),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_size=head_size,
        block_size=block_size,
        dtype=TORCH_DTYPES[dtype],
        device=platform.device(0),
        seed=len(backend_name),
        num_padding_tokens=2,
    )
    impl = backend(spec)
    out = torch.empty_like(batch.query)
    result = impl.forward(
        batch.query, batch.key, batch.value, batch.kv_cache, backend.build_metadata(batch.layout), out
    )
    platform.synchronize()
    assert result is out

    got = out[: batch.num_real_tokens].cpu()
    assert not torch.isnan(got).any(), "NaN leaked from unused cache slots"
    want = expected_attention(batch, scale, window, soft_cap)[: batch.num_real_tokens]
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)

    # The new keys/values landed at their slots; padding tokens wrote nowhere.
    slots = cache_slot_view(batch.kv_cache).cpu()
    real = torch.from_numpy(batch.layout.slot_mapping[: batch.num_real_tokens])
    assert torch.equal(slots[0, real], batch.key[: batch.num_real_tokens].cpu())
    assert torch.equal(slots[1, real], batch.value[: batch.num_real_tokens].cpu())
    filled = ~torch.isnan(slots).any(dim=(0, 2, 3))
    assert int(filled.sum()) == int(batch.layout.seq_lens.sum())


def _head_size(backend: type[AttentionBackend]) -> int:
    if backend.head_sizes is None or 64 in backend.head_sizes:
        return 64
    return min(backend.head_sizes)


def _block_size(backend: type[AttentionBackend]) -> int:
    if backend.block_sizes is not None:
        return min(backend.block_sizes)
    # Small blocks, so requests span several shuffled blocks.
    return backend.block_size_multiple * max(1, 4 // backend.block_size_multiple)


def _supported_spec(
    backend: type[AttentionBackend], platform_dtypes: tuple[str, ...], **overrides: object
) -> AttentionSpec:
    """A layer spec inside everything `backend` declares (features included), then overrides."""
    fields: dict[str, object] = {
        "num_heads": 8,
        "num_kv_heads": 2,
        "head_size": _head_size(backend),
        "scale": 0.125,
        "dtype": next(d for d in platform_dtypes if d in backend.dtypes),
        "block_size": _block_size(backend),
        "sliding_window": 16 if "sliding_window" in backend.features else None,
        "logits_soft_cap": 30.0 if "soft_cap" in backend.features else None,
    }
    fields.update(overrides)
    return AttentionSpec(**fields)  # type: ignore[arg-type]
