"""The `shared_storage` connector's load path alone: block files (blocks.encode_block) of
`--blocks` blocks of a model's per-layer KV shapes (default Llama-3.1-8B: 32 layers of
[2, 16 tokens, 8 KV heads, 128] bfloat16, 2 MB a block) read from a directory (warm in the page
cache after the first pass) into the KV caches. Compared, in one process on the same files:

- `serial`: the connector's former path, per file read_bytes + decode_block (a bytearray copy),
  then per layer torch.stack over the blocks and index_copy_ into the cache;
- `staged`: block_files.BlockFileLoader (readinto a staging slot, checksum in place, one scatter
  per layer and chunk; with `--device cuda` one device copy per chunk from pinned staging).

Reported: the median wall time of `--repeats` loads and the bandwidth over the payload bytes.

    .venv/bin/python benchmarks/kv_storage_load.py [--blocks 256] [--device cpu] [--readers N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--blocks", type=int, default=256)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--readers", type=int, default=None, help="staged: reader threads (default: the loader's)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--dir", default=None, help="where the block files go (default: a temporary directory)")
    args = p.parse_args()

    import torch

    from hallm.core.kv_connectors.block_files import BlockFileLoader, ReadResult
    from hallm.core.kv_connectors.blocks import decode_block, encode_block

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = (2, args.blocks + 8, args.block_size, args.kv_heads, args.head_size)
    caches = [torch.zeros(shape, dtype=torch.bfloat16, device=device) for _ in range(args.layers)]
    directory = Path(args.dir or tempfile.mkdtemp(prefix="hallm-kv-load-"))
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    paths = []
    for b in range(args.blocks):
        layers = [torch.randn(shape[0], *shape[2:]).to(torch.bfloat16) for _ in range(args.layers)]
        path = directory / f"{b:04d}.kvb"
        path.write_bytes(encode_block(layers))
        paths.append(path)
    block_ids = list(range(8, 8 + args.blocks))[::-1]  # not in file order: a real scatter
    total = sum(p.stat().st_size for p in paths)

    def serial() -> None:
        read = [decode_block(path.read_bytes(), caches) for path in paths]
        dst = torch.tensor(block_ids, dtype=torch.long, device=device)
        for i, cache in enumerate(caches):
            data = torch.stack([layers[i] for layers in read if layers is not None], dim=1)
            cache.index_copy_(1, dst, data.to(device, non_blocking=True))

    pin = device.type != "cpu"
    loader = BlockFileLoader(caches, pin=pin, readers=args.readers)

    def staged() -> None:
        def accept(i: int, result: ReadResult) -> bool:
            return result is True

        loader.load(list(zip(block_ids, paths, strict=True)), accept)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    results: dict[str, float] = {}
    checks: dict[str, torch.Tensor] = {}
    for name, fn in (("serial", serial), ("staged", staged)):
        fn()  # warm: page cache, allocator
        sync()
        times = []
        for _ in range(args.repeats):
            for c in caches:
                c.zero_()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        results[name] = statistics.median(times)
        checks[name] = torch.stack([c[:, 8:].float().sum() for c in caches]).cpu()
        print(
            f"{name:7s} median {results[name] * 1e3:8.1f} ms over {args.repeats} "
            f"({total / results[name] / 1e9:5.2f} GB/s of {total / 1e6:.0f} MB in {args.blocks} files); "
            f"all: {' '.join(f'{t * 1e3:.0f}' for t in times)} ms"
        )
    loader.close()
    print(f"same cache contents: {torch.equal(checks['serial'], checks['staged'])}")
    print(f"staged is {results['serial'] / results['staged']:.2f}x faster than serial")


if __name__ == "__main__":
    main()
