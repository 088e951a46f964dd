"""Random weights with the real shapes, for benchmarks and memory profiling without a checkpoint."""

from __future__ import annotations

import torch
from torch import nn


def _generator(device: torch.device, seed: int) -> torch.Generator:
    try:
        return torch.Generator(device=device).manual_seed(seed)
    except RuntimeError:  # a device without its own generator: draw on the CPU
        return torch.Generator().manual_seed(seed)


@torch.no_grad()
def init_dummy_weights(model: nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Fill every parameter, deterministically for a seed: norm weights 1, biases 0, the rest N(0, std)."""
    gens: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias":
            param.zero_()
        elif param.ndim == 1 and "norm" in name.lower():
            param.fill_(1.0)
        else:
            gen = gens.setdefault(param.device, _generator(param.device, seed))
            if gen.device == param.device:
                param.normal_(0.0, std, generator=gen)
            else:
                param.copy_(torch.empty(param.shape, dtype=param.dtype).normal_(0.0, std, generator=gen))
