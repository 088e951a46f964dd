"""Copy HF-named checkpoint tensors into a model, fusing split projections on the way.

Native models keep HF's module names except where they fuse several HF linears into one
(q/k/v -> qkv_proj, gate/up -> gate_up_proj). A `FusedShard` says where one HF tensor goes
inside a fused parameter: rows `[start, start + size)` of its first dimension.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from hallm.core.distributed.sharding import Shard
from hallm.core.models.interface import CheckpointMismatchError

_MAX_LISTED = 10


@dataclasses.dataclass(frozen=True)
class FusedShard:
    """Checkpoint module name `src` (e.g. "q_proj") lives in fused module `dst` at rows [start, start+size)."""

    src: str
    dst: str
    start: int
    size: int


@dataclasses.dataclass(frozen=True)
class ExpertShard:
    """Per-expert checkpoint tensor `<prefix>.experts.<e>.<src>.weight` lives in the stacked
    parameter `<prefix>.experts.<dst>` at `[e, start:start+size]` (size None: all of `[e]`)."""

    src: str
    dst: str
    start: int = 0
    size: int | None = None


def expert_shards(gate: str, up: str, down: str, intermediate_size: int) -> list[ExpertShard]:
    """Shards of per-expert gate/up/down linears into `gate_up_proj` / `down_proj`
    (hallm.core.layers.moe.FusedMoE's layout); e.g. Mixtral's ("w1", "w3", "w2")."""
    return [
        ExpertShard(gate, "gate_up_proj", 0, intermediate_size),
        ExpertShard(up, "gate_up_proj", intermediate_size, intermediate_size),
        ExpertShard(down, "down_proj"),
    ]


def _listing(names: Iterable[str]) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def load_checkpoint_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    fused: Iterable[FusedShard] = (),
    ignore_suffixes: tuple[str, ...] = (),
    ignore_names: frozenset[str] = frozenset(),
    experts: Iterable[ExpertShard] = (),
) -> set[str]:
    """Copy `weights` into `model`'s parameters (and persistent buffers); return the names filled.

    Names are the model's own (after fusing). Tensors are cast to the parameter's dtype and
    moved to its device. Tied parameters appear once (under their first name). Raises
    CheckpointMismatchError naming every unexpected, mis-shaped and missing tensor.
    """
    targets: dict[str, torch.Tensor] = dict(model.named_parameters())
    required = set(targets)  # persistent buffers are loaded when present, never required
    targets.update({n: b for n, b in model.named_buffers() if _is_persistent(model, n)})
    by_src = {f".{s.src}.": s for s in fused}
    by_expert = {s.src: s for s in experts}
    expert_re = (
        re.compile(r"^(.*\.experts)\.(\d+)\.(" + "|".join(map(re.escape, by_expert)) + r")\.weight$")
        if by_expert
        else None
    )
    # fused parameter name -> shard sources still expected
    pending_shards: dict[str, set[str]] = {}
    loaded: set[str] = set()
    unexpected: list[str] = []
    bad_shapes: list[str] = []

    for name, tensor in weights:
        if name in ignore_names or name.endswith(ignore_suffixes):
            continue
        match = expert_re.match(name) if expert_re is not None else None
        if match is not None:
            prefix, e, src = match.group(1), int(match.group(2)), match.group(3)
            ex = by_expert[src]
            target_name = f"{prefix}.{ex.dst}"
            param = targets.get(target_name)
            if param is None or e >= param.shape[0]:
                unexpected.append(name)
                continue
            dst = param.data[e] if ex.size is None else param.data[e, ex.start : ex.start + ex.size]
            if tuple(tensor.shape) != tuple(dst.shape):
                bad_shapes.append(
                    f"{name}: checkpoint {tuple(tensor.shape)}, model expects {tuple(dst.shape)}"
                )
                continue
            with torch.no_grad():
                dst.copy_(tensor)
            parts = {
                f"{i}.{s.src}" for i in range(param.shape[0]) for s in by_expert.values() if s.dst == ex.dst
            }
            left = pending_shards.setdefault(target_name, parts)
            left.discard(f"{e}.{src}")
            if not left:
                loaded.add(target_name)
            continue
        shard = next((s for key, s in by_src.items() if key in name), None)
        if shard is not None:
            target_name = name.replace(f".{shard.src}.", f".{shard.dst}.")
            param = targets.get(target_name)
            if param is None:
                unexpected.append(name)
                continue
            expected = (shard.size, *param.shape[1:])
            if tuple(tensor.shape) != expected:
                bad_shapes.append(f"{name}: checkpoint {tuple(tensor.shape)}, model expects {expected}")
                continue
            with torch.no_grad():
                param.data[shard.start : shard.start + shard.size].copy_(tensor)
            group = {s.src for s in by_src.values() if s.dst == shard.dst}
            left = pending_shards.setdefault(target_name, group)
            left.discard(shard.src)
            if not left:
                loaded.add(target_name)
            continue
        param = targets.get(name)
        if param is None:
            unexpected.append(name)
            continue
        if tuple(tensor.shape) != tuple(param.shape):
            bad_shapes.append(f"{name}: checkpoint {tuple(tensor.shape)}, model expects {tuple(param.shape)}")
            continue
        with torch.no_grad():
            param.data.copy_(tensor)
        loaded.add(name)

    missing = [n for n in required if n not in loaded]
    problems = []
    if unexpected:
        problems.append(f"unexpected weights (not in the model): {_listing(unexpected)}")
    if bad_shapes:
        problems.append(f"weights with the wrong shape: {_listing(bad_shapes)}")
    if missing:
        partial = {n: _listing(s) for n, s in pending_shards.items() if s and n in missing}
        detail = f" (fused parameters still missing parts: {partial})" if partial else ""
        problems.append(f"missing weights (not in the checkpoint): {_listing(missing)}{detail}")
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint does not match {type(model).__name__}: "
            + "; ".join(problems)
            + ". Check that config.json belongs to these weights."
        )
    return loaded


def _is_persistent(model: nn.Module, buffer_name: str) -> bool:
    module_name, _, leaf = buffer_name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return leaf not in module._non_persistent_buffers_set


def shard_for_rank(
    weights: Iterable[tuple[str, torch.Tensor]], shards: Mapping[str, Shard]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Cut each checkpoint tensor to this rank's part as it arrives. `shards` maps the end of a
    tensor's name, with its numeric parts (layer and expert indices) written "*", to its `Shard`;
    the longest matching end wins ("experts.*.gate_proj.weight" before "gate_proj.weight"). A
    name without an entry is whole on every rank (norms, row-parallel biases, routers)."""
    for name, tensor in weights:
        parts = ["*" if p.isdigit() else p for p in name.split(".")]
        shard = None
        for k in (4, 3, 2):
            shard = shards.get(".".join(parts[-k:])) if len(parts) >= k else None
            if shard is not None:
                break
        if shard is None:
            yield name, tensor
            continue
        if shard.blocks > 1:
            block = tensor.shape[shard.dim] // shard.blocks
            part = torch.cat(
                [tensor.narrow(shard.dim, b * block + shard.start, shard.size) for b in range(shard.blocks)],
                dim=shard.dim,
            )
            yield name, part
            continue
        part = tensor.narrow(
            shard.dim, shard.start, max(0, min(shard.size, tensor.shape[shard.dim] - shard.start))
        )
        if shard.pad_to is not None and part.shape[0] < shard.pad_to:
            pad = part.new_zeros((shard.pad_to - part.shape[0], *part.shape[1:]))
            part = torch.cat([part, pad])
        yield name, part


def stacked_shards(qkv: Mapping[str, int] | None = None, gate_up: int | None = None) -> list[FusedShard]:
    """Shards for the usual fusions: `qkv={"q": q_rows, "k": kv_rows, "v": kv_rows}` and
    `gate_up=intermediate_size`."""
    shards: list[FusedShard] = []
    if qkv is not None:
        start = 0
        for part, rows in qkv.items():
            shards.append(FusedShard(f"{part}_proj", "qkv_proj", start, rows))
            start += rows
    if gate_up is not None:
        shards.append(FusedShard("gate_proj", "gate_up_proj", 0, gate_up))
        shards.append(FusedShard("up_proj", "gate_up_proj", gate_up, gate_up))
    return shards
