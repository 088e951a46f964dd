"""Source of the fake device plugins the conformance self-tests install into a temporary site.

One good plugin (with a KV connector) and deliberately broken ones, each broken in exactly one
way a real kernel or plugin goes wrong. They all run on the host CPU through
`hallm.ops.reference`, altered where the fault is; only float32 is declared, to keep runs short.
"""

from __future__ import annotations

#: A shared platform factory: one Platform subclass per device id, backends by "module:Class".
PLATFORM = """
import functools
import importlib
from hallm.platforms import Capabilities, Platform, Probe


@functools.lru_cache(maxsize=None)
def make_platform(device_id, backend_path):
    module, _, cls_name = backend_path.partition(":")

    class FakePlatform(Platform):
        name = device_id
        device_type = "cpu"
        api_version = "1.0"
        auto_priority = -100

        @classmethod
        def probe(cls):
            return Probe(True, "fake device on the host CPU", 1)

        def capabilities(self):
            return Capabilities(dtypes=("float32",))

        def attention_backends(self):
            return [getattr(importlib.import_module(module), cls_name)]

        def memory_info(self, device_index=0):
            return (4 << 30, 8 << 30)

    FakePlatform.__qualname__ = f"FakePlatform[{device_id}]"
    return FakePlatform
"""

#: Attention backends: a correct one, and one subclass per fault.
KERNELS = '''
import torch
from hallm.ops import reference
from hallm.platforms import FEATURE_SLIDING_WINDOW, FEATURE_SOFT_CAP, AttentionBackend


class Good(AttentionBackend):
    name = "fake_good"
    dtypes = frozenset({"float32"})
    features = frozenset({FEATURE_SLIDING_WINDOW, FEATURE_SOFT_CAP})

    def forward(self, query, key, value, kv_cache, metadata, out):
        t = metadata.tensors
        self.write(key, value, kv_cache, t.slot_mapping)
        return self.attend(query, kv_cache, t.query_start_loc, t.seq_lens, t.context_lens, t.block_tables, out)

    def write(self, key, value, kv_cache, slot_mapping):
        reference.write_kv(key, value, kv_cache, slot_mapping)

    def attend(self, query, kv_cache, qsl, seq_lens, ctx_lens, tables, out, scale=None):
        s = self.spec
        return reference.paged_attention(
            query, kv_cache, qsl, seq_lens, ctx_lens, tables, s.scale if scale is None else scale,
            s.num_kv_heads, sliding_window=s.sliding_window, logits_soft_cap=s.logits_soft_cap, out=out,
        )


class WrongScale(Good):
    """Divides q.k by head_size instead of applying spec.scale."""
    name = "fake_wrong_scale"

    def attend(self, query, kv_cache, qsl, seq_lens, ctx_lens, tables, out, scale=None):
        return super().attend(query, kv_cache, qsl, seq_lens, ctx_lens, tables, out, scale=1.0 / self.spec.head_size)


class BlockWalkOffByOne(Good):
    """Reads block-table entry k+1 for the positions of entry k."""
    name = "fake_block_walk_off_by_one"

    def attend(self, query, kv_cache, qsl, seq_lens, ctx_lens, tables, out, scale=None):
        shifted = torch.roll(tables, shifts=-1, dims=1)
        return super().attend(query, kv_cache, qsl, seq_lens, ctx_lens, shifted, out, scale)


class WriteIgnoresSlotMapping(Good):
    """Writes token t's key/value at flat slot t, whatever slot_mapping says."""
    name = "fake_write_ignores_slots"

    def write(self, key, value, kv_cache, slot_mapping):
        slots = torch.arange(key.shape[0], device=key.device)
        reference.write_kv(key, value, kv_cache, slots)


class WrongGqaMapping(Good):
    """Query head h reads KV head h % num_kv_heads instead of h // group."""
    name = "fake_wrong_gqa"

    def attend(self, query, kv_cache, qsl, seq_lens, ctx_lens, tables, out, scale=None):
        s = self.spec
        group = s.num_heads // s.num_kv_heads
        tiled = kv_cache.repeat(1, 1, 1, group, 1)  # head h of the tiled cache is KV head h % num_kv_heads
        return reference.paged_attention(
            query, tiled, qsl, seq_lens, ctx_lens, tables, s.scale, s.num_heads,
            sliding_window=s.sliding_window, logits_soft_cap=s.logits_soft_cap, out=out,
        )


class DeviceError(Good):
    """The device dies on the first kernel launch (as after a CUDA illegal memory access)."""
    name = "fake_device_error"

    def forward(self, query, key, value, kv_cache, metadata, out):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
'''

#: A KV connector keeping saved blocks in process memory, keyed by the prompt's tokens.
CONNECTOR = """
import torch
from hallm.platforms import KVConnector

_STORE = {}


class MemoryConnector(KVConnector):
    name = "fake_memory"

    def __init__(self, config, role):
        super().__init__(config, role)
        self._pending, self._meta, self._caches = {}, {}, {}

    def num_external_tokens(self, request, num_computed):
        stored = _STORE.get(tuple(request.prompt_token_ids))
        return max(0, stored["n"] - num_computed) if stored else 0

    def on_blocks_allocated(self, request, block_ids, num_external):
        self._pending[request.request_id] = (tuple(request.prompt_token_ids), list(block_ids), num_external)

    def build_step_meta(self):
        meta, self._pending = self._pending, {}
        return meta

    def register_kv_caches(self, caches):
        self._caches = caches

    def start_load(self, meta):
        self._meta = meta
        for key, blocks, n in meta.values():
            for layer, cache in self._caches.items():
                bs = cache.shape[2]
                for p in range(n):
                    cache[:, blocks[p // bs], p % bs] = _STORE[key][layer][:, p].to(cache.device)

    def save_layer(self, layer_name, kv_cache, layout):
        bs = kv_cache.shape[2]
        for key, blocks, _ in self._meta.values():
            n = (len(key) // bs) * bs
            data = torch.stack([kv_cache[:, blocks[p // bs], p % bs] for p in range(n)], dim=1)
            _STORE.setdefault(key, {"n": n})[layer_name] = data.cpu().clone()
"""


def plugin_module(
    device_id: str, backend: str, *, preamble: str = "", connector: bool = False, patch: str = ""
) -> str:
    """The entry-point module of one fake device plugin."""
    hooks = f"""
from hallm.platforms import hookimpl
{preamble}

@hookimpl
def hallm_platform():
    from fake_platform import make_platform
{patch}
    return make_platform({device_id!r}, {f"fake_kernels:{backend}"!r})
"""
    if connector:
        hooks += """

@hookimpl
def hallm_kv_connectors():
    from fake_connector import MemoryConnector
    return {"fake_memory": MemoryConnector}
"""
    return hooks


#: A device runtime that, like every torch device extension, pulls in torch when imported.
ACME_RUNTIME = "import torch  # noqa: F401\nINITIALIZED = True\n"
#: The core function the `badpatch` plugin replaces when asked for its platform.
PATCH = """    import hallm.ops.reference as ref
    original = ref.paged_attention
    ref.paged_attention = lambda *args, **kwargs: original(*args, **kwargs)"""

#: device id -> (kernel class, plugin_module keyword arguments, what the fault is)
DEVICES: dict[str, tuple[str, dict[str, object]]] = {
    "fakegood": ("Good", {"connector": True}),
    "badscale": ("WrongScale", {}),
    "badwalk": ("BlockWalkOffByOne", {}),
    "badwrite": ("WriteIgnoresSlotMapping", {}),
    "badgqa": ("WrongGqaMapping", {}),
    "eagerimport": (
        "Good",
        {"preamble": "import acme_runtime  # the fault: a device runtime at import time"},
    ),
    "badpatch": ("Good", {"patch": PATCH}),
    "deviceerror": ("DeviceError", {}),
}
