"""`shard_for_rank`: the most specific name wins, and a stacked gate/up tensor gives each rank
its rows of the gate and of the up half."""

from __future__ import annotations

import torch

from hallm.core.distributed.sharding import Shard
from hallm.core.models.weights import shard_for_rank


def test_the_longest_matching_name_end_wins() -> None:
    shards = {
        "gate_proj.weight": Shard(0, 0, 1),
        "shared_expert.gate_proj.weight": Shard(0, 1, 2),
        "experts.*.gate_proj.weight": Shard(0, 2, 3),
    }
    w = torch.arange(8.0).unsqueeze(1)  # [8, 1]: row i holds i
    names = [
        "model.layers.3.mlp.gate_proj.weight",
        "model.layers.3.mlp.shared_expert.gate_proj.weight",
        "model.layers.3.mlp.experts.12.gate_proj.weight",
        "model.layers.3.mlp.shared_expert_gate.weight",  # no entry: whole
    ]
    got = {name: t[:, 0].tolist() for name, t in shard_for_rank(((n, w) for n in names), shards)}
    assert got == {
        names[0]: [0.0],
        names[1]: [1.0, 2.0],
        names[2]: [2.0, 3.0, 4.0],
        names[3]: [float(i) for i in range(8)],
    }


def test_stacked_gate_up_gives_each_rank_both_halves() -> None:
    experts, inter, hidden, world = 3, 4, 5, 2
    gate = torch.randn(experts, inter, hidden)
    up = torch.randn(experts, inter, hidden)
    down = torch.randn(experts, hidden, inter)
    stacked = torch.cat([gate, up], dim=1)  # transformers' in-memory layout [E, 2I, H]
    local = inter // world
    for r in range(world):
        shards = {
            "experts.gate_up_proj": Shard(1, r * local, local, blocks=2),
            "experts.down_proj": Shard(2, r * local, local),
        }
        out = dict(
            shard_for_rank(
                [
                    ("m.layers.0.mlp.experts.gate_up_proj", stacked),
                    ("m.layers.0.mlp.experts.down_proj", down),
                ],
                shards,
            )
        )
        rows = slice(r * local, (r + 1) * local)
        expected = torch.cat([gate[:, rows], up[:, rows]], dim=1)
        assert torch.equal(out["m.layers.0.mlp.experts.gate_up_proj"], expected)
        assert torch.equal(out["m.layers.0.mlp.experts.down_proj"], down[:, :, rows])
