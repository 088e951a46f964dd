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
def make_platform(device_id, backend_paths, dtypes=("float32",), graph_capture=False, available=True):
    # backend_paths: "module:Class" or a tuple of them, most preferred first.
    paths = (backend_paths,) if isinstance(backend_paths, str) else tuple(backend_paths)

    class FakePlatform(Platform):
        name = device_id
        device_type = "cpu"
        api_version = "1.0"
        auto_priority = -100

        @classmethod
        def probe(cls):
            if not available:
                return Probe(False, "no fake accelerator in this machine (install one)")
            return Probe(True, "fake device on the host CPU", 1)

        def capabilities(self):
            return Capabilities(dtypes=tuple(dtypes), graph_capture=graph_capture)

        def attention_backends(self):
            found = []
            for path in paths:
                module, _, cls_name = path.partition(":")
                found.append(getattr(importlib.import_module(module), cls_name))
            return found

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


class GatherSdpa(Good):
    """A vendor's own kernel: gather each request's keys/values through its block table, then
    a masked softmax in float32. Correct as it stands; each subclass below breaks one thing, the
    way the variants that once escaped the kit did."""
    name = "fake_gather_sdpa"
    dtypes = frozenset({"float32", "bfloat16"})
    max_keys = None  # keys at positions >= max_keys are dropped
    accumulate_tile = None  # P.V summed tile by tile into an accumulator of the input dtype
    zero_unattended = True  # keys/values no query attends are zeroed before any arithmetic
    zero_padding = True  # rows of padding tokens are zeroed
    offset_period = None  # for block sizes >= 64, the in-block offset is p % offset_period
    causal = True  # False: every new token attends to every position of its request
    honour_window = True  # False: spec.sliding_window is ignored

    def attend(self, query, kv_cache, qsl, seq_lens, ctx_lens, tables, out, scale=None):
        s = self.spec
        scale = s.scale if scale is None else scale
        bs = kv_cache.shape[2]
        flat = kv_cache.view(2, -1, kv_cache.shape[3], kv_cache.shape[4])
        group = s.num_heads // s.num_kv_heads
        qsl, seq_lens, ctx_lens = qsl.tolist(), seq_lens.tolist(), ctx_lens.tolist()
        if self.zero_padding:
            out[qsl[-1]:].zero_()
        for i, seq in enumerate(seq_lens):
            lo, hi, ctx = qsl[i], qsl[i + 1], ctx_lens[i]
            if hi == lo:
                continue
            pos = torch.arange(seq, device=query.device)
            offset = pos % bs if self.offset_period is None or bs < 64 else pos % self.offset_period
            slots = tables[i, pos // bs].long() * bs + offset
            k = flat[0, slots].float().repeat_interleave(group, dim=1)  # [S, H, D]
            v = flat[1, slots].float().repeat_interleave(group, dim=1)
            q_pos = ctx + torch.arange(hi - lo, device=query.device)[:, None]
            allowed = pos[None, :] <= q_pos if self.causal else torch.ones(hi - lo, seq, dtype=torch.bool)
            if s.sliding_window is not None and self.honour_window:
                allowed &= pos[None, :] > q_pos - s.sliding_window
            if self.max_keys is not None:
                allowed &= pos[None, :] < self.max_keys
            if self.zero_unattended:
                unused = ~allowed.any(dim=0)
                k[unused] = 0
                v[unused] = 0
            scores = torch.einsum("qhd,shd->hqs", query[lo:hi].float(), k) * scale
            if s.logits_soft_cap is not None:
                scores = s.logits_soft_cap * torch.tanh(scores / s.logits_soft_cap)
            scores = scores.masked_fill(~allowed[None], float("-inf"))
            p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))  # [H, Q, S]
            total = p.sum(dim=-1, keepdim=True)
            if self.accumulate_tile is not None and query.dtype != torch.float32:
                acc = torch.zeros(p.shape[0], p.shape[1], k.shape[-1], dtype=query.dtype, device=query.device)
                for t in range(0, seq, self.accumulate_tile):
                    tile = torch.einsum("hqs,shd->hqd", p[..., t : t + self.accumulate_tile], v[t : t + self.accumulate_tile])
                    acc = (acc.float() + tile).to(query.dtype)
                result = acc.float() / total
            else:
                result = torch.einsum("hqs,shd->hqd", p, v) / total
            out[lo:hi] = result.transpose(0, 1).to(out.dtype)
        return out


class Bf16TileAccumulation(GatherSdpa):
    """Sums P.V into a bf16 accumulator, 16 keys at a time (2k contexts stay within 0.02)."""
    name = "fake_bf16_tiles"
    accumulate_tile = 16


class DropsKeysPast4096(GatherSdpa):
    """Attends to the first 4096 positions only (a fixed maximum sequence tile)."""
    name = "fake_drops_past_4096"
    max_keys = 4096


class OffsetWrongFromBlock64(GatherSdpa):
    """For block sizes >= 64 the in-block offset is p % 32 (a 5-bit mask)."""
    name = "fake_offset_wrong_b64"
    offset_period = 32


class NullBlocksNotMasked(GatherSdpa):
    """Masks scores only: NaN in blocks outside the sliding window flows through P.V (NaN * 0)."""
    name = "fake_null_blocks_not_masked"
    zero_unattended = False


class NonCausal(GatherSdpa):
    """No causal mask: prefill tokens see the later tokens of their request."""
    name = "fake_non_causal"
    causal = False


class WindowIgnored(GatherSdpa):
    """Declares the sliding window but attends to the whole causal context."""
    name = "fake_window_ignored"
    honour_window = False


class PaddingRowsNotZeroed(GatherSdpa):
    """Leaves the rows of padding tokens as it found them."""
    name = "fake_padding_not_zeroed"
    zero_padding = False


class RaisesForBfloat16(Good):
    """Declares bfloat16 but raises in forward for it: one cause behind many failures."""
    name = "fake_raises_bf16"
    dtypes = frozenset({"float32", "bfloat16"})

    def forward(self, query, key, value, kv_cache, metadata, out):
        if query.dtype == torch.bfloat16:
            raise NotImplementedError("bfloat16 kernels are not built in this wheel")
        return super().forward(query, key, value, kv_cache, metadata, out)


class DeviceError(Good):
    """The device dies on the first kernel launch (as after a CUDA illegal memory access)."""
    name = "fake_device_error"

    def forward(self, query, key, value, kv_cache, metadata, out):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
'''

#: A KV connector keeping saved blocks in process memory, keyed by the prompt's tokens; and
#: `LoadsFromZero`, the same with one fault: a load ignores the local prefix-cache hit
#: (request.num_computed_tokens) and writes the prompt from position 0 over its blocks.
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

    def first_loaded(self, request):
        return request.num_computed_tokens

    def on_blocks_allocated(self, request, block_ids, num_external):
        start = self.first_loaded(request)
        self._pending[request.request_id] = (
            tuple(request.prompt_token_ids), list(block_ids), start, num_external
        )

    def build_step_meta(self):
        meta, self._pending = self._pending, {}
        return meta

    def register_kv_caches(self, caches):
        self._caches = caches

    def start_load(self, meta):
        self._meta = meta
        for key, blocks, start, n in meta.values():
            for layer, cache in self._caches.items():
                bs = cache.shape[2]
                for p in range(start, start + n):
                    cache[:, blocks[p // bs], p % bs] = _STORE[key][layer][:, p].to(cache.device)

    def save_layer(self, layer_name, kv_cache, layout):
        bs = kv_cache.shape[2]
        for key, blocks, _, n_load in self._meta.values():
            if n_load:
                continue
            n = (len(key) // bs) * bs
            data = torch.stack([kv_cache[:, blocks[p // bs], p % bs] for p in range(n)], dim=1)
            _STORE.setdefault(key, {"n": n})[layer_name] = data.cpu().clone()


class LoadsFromZero(MemoryConnector):
    name = "fake_loads_from_zero"

    def first_loaded(self, request):
        return 0
"""


def plugin_module(
    device_id: str,
    backend: str | tuple[str, ...],
    *,
    preamble: str = "",
    connector: str = "",
    patch: str = "",
    dtypes: tuple[str, ...] = ("float32",),
    graph_capture: bool = False,
    available: bool = True,
) -> str:
    """The entry-point module of one fake device plugin (backend: a kernel class or several)."""
    names = (backend,) if isinstance(backend, str) else backend
    paths = tuple(f"fake_kernels:{b}" for b in names)
    hooks = f"""
from hallm.platforms import hookimpl
{preamble}

@hookimpl
def hallm_platform():
    from fake_platform import make_platform
{patch}
    return make_platform({device_id!r}, {paths!r}, {dtypes!r}, {graph_capture!r}, {available!r})
"""
    if connector:
        hooks += f"""

@hookimpl
def hallm_kv_connectors():
    from fake_connector import {connector}
    return {{{connector}.name: {connector}}}
"""
    return hooks


#: hallm-rocm's platform with its Triton kernels and launch parameters (an MI300X: gfx942, 304
#: CUs, 64-wide wavefronts) on the host CPU through Triton's interpreter: what of the rocm plugin
#: the kit can check without an AMD GPU. Only the device runtime (torch.cuda, which is HIP on a
#: ROCm build) is the host's; everything the kernels see is the plugin's.
ROCM_INTERPRETED = """
import os

from hallm.platforms import Capabilities, Platform, Probe, hookimpl


def _platform():
    from hallm_rocm.platform import RocmPlatform

    class RocmInterpreted(RocmPlatform):
        name = "rocminterp"
        device_type = "cpu"
        dist_backend = "gloo"
        visible_devices_env = None
        ray_resource = None
        auto_priority = -100

        @classmethod
        def probe(cls):
            if os.environ.get("TRITON_INTERPRET") != "1":
                return Probe(False, "set TRITON_INTERPRET=1: this device runs hallm-rocm's kernels in Triton's interpreter")
            return Probe(True, "hallm-rocm's Triton kernels for gfx942 in Triton's interpreter", 1)

        def arch(self, index=0):
            return "gfx942"

        def triton_target(self):
            from hallm.ops.triton.target import amd_target

            return amd_target("gfx942", 304)

        def capabilities(self):
            return Capabilities(dtypes=("float32", "bfloat16"), kv_cache_dtypes=("auto",), graph_capture=False)

        def device_name(self, index=0):
            return "gfx942 launches (MI300X, 304 CUs) in Triton's interpreter on the host CPU"

        def step_graphs(self, target):
            return None

        def warm_up_at_start(self):
            return False  # interpreted kernels compile nothing; the warm-up would only cost CI time

        def memory_info(self, device_index=0):
            return (4 << 30, 8 << 30)

    # the host's runtime, not torch.cuda's (this process has no GPU)
    for name in ("device", "set_device", "synchronize", "empty_cache", "manual_seed", "peak_memory_bytes",
                 "allocated_memory_bytes", "reset_peak_memory"):
        setattr(RocmInterpreted, name, getattr(Platform, name))
    return RocmInterpreted


@hookimpl
def hallm_platform():
    return _platform()
"""

#: A device runtime that, like every torch device extension, pulls in torch when imported.
ACME_RUNTIME = "import torch  # noqa: F401\nINITIALIZED = True\n"
#: The core function the `badpatch` plugin replaces when asked for its platform.
PATCH = """    import hallm.ops.reference as ref
    original = ref.paged_attention
    ref.paged_attention = lambda *args, **kwargs: original(*args, **kwargs)"""

#: The correct gather-then-softmax kernel, then one subclass per escaped variant.
MUTANT_BACKENDS = (
    "GatherSdpa",
    "Bf16TileAccumulation",
    "DropsKeysPast4096",
    "OffsetWrongFromBlock64",
    "NullBlocksNotMasked",
    "PaddingRowsNotZeroed",
    # Failure shapes the kit diagnoses besides: the mask and the window.
    "NonCausal",
    "WindowIgnored",
)

#: device id -> (kernel class or classes, plugin_module keyword arguments)
DEVICES: dict[str, tuple[str | tuple[str, ...], dict[str, object]]] = {
    "fakegood": ("Good", {"connector": "MemoryConnector"}),
    "badconnector": ("Good", {"connector": "LoadsFromZero"}),
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
    # The variants that once escaped the kit, one backend each, next to their correct base
    # (which must pass everything): kernels in one run, declarations in one run each.
    "escaped": (
        MUTANT_BACKENDS,
        {"dtypes": ("float32", "bfloat16")},
    ),
    "fp16unserved": ("Good", {"dtypes": ("float32", "float16")}),
    "graphsclaimed": ("Good", {"graph_capture": True}),
    "raiser": ("RaisesForBfloat16", {"dtypes": ("float32", "bfloat16")}),
    "absent": ("Good", {"available": False}),
}
