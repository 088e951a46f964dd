"""Block files (blocks.encode_block) read back into a staging slot (`read_block_file`) and into
the caches (`BlockFileLoader`): intact files round-trip; short, long, corrupt and foreign files
are refused; the loader copies exactly the accepted blocks, in order, across chunks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hallm.core.kv_connectors.block_files import BlockFileLoader, ReadResult
from hallm.core.kv_connectors.blocks import block_layout, encode_block, read_block_file


def caches(dtype: torch.dtype = torch.float32, blocks: int = 12, seed: int = 0) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    return [torch.randn(2, blocks, 4, 2, 8).to(dtype) for _ in range(3)]


def write(path: Path, layers: list[torch.Tensor]) -> Path:
    path.write_bytes(encode_block(layers))
    return path


def slot(layers: list[torch.Tensor]) -> memoryview:
    return memoryview(bytearray(block_layout(layers).payload_bytes))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_read_block_file_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    src = caches(dtype)
    path = write(tmp_path / "b.kvb", [c[:, 3] for c in src])
    out = slot(src)
    assert read_block_file(path, out, block_layout(src)) is True
    raw = torch.frombuffer(out, dtype=torch.uint8)
    offset = 0
    for c, nbytes in zip(src, block_layout(src).layer_bytes, strict=True):
        got = raw[offset : offset + nbytes].view(dtype).view(c[:, 3].shape)
        assert torch.equal(got, c[:, 3])
        offset += nbytes


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],  # truncated
        lambda b: b[:10],  # shorter than the header
        lambda b: b + b"\x00",  # longer than it says
        lambda b: b[:-1] + bytes([b[-1] ^ 1]),  # same length, wrong checksum
        lambda b: b"NOTAKVB!" + b[8:],  # another magic
        lambda b: b"",
    ],
)
def test_read_block_file_refuses_damaged_files(tmp_path: Path, damage: object) -> None:
    src = caches()
    path = tmp_path / "b.kvb"
    path.write_bytes(damage(encode_block([c[:, 0] for c in src])))  # type: ignore[operator]
    assert read_block_file(path, slot(src), block_layout(src)) is False


def test_read_block_file_refuses_another_layout(tmp_path: Path) -> None:
    src = caches()
    other = [torch.randn(2, 12, 4, 4, 4) for _ in range(3)]  # same bytes per block, other shape
    path = write(tmp_path / "b.kvb", [c[:, 0] for c in other])
    assert read_block_file(path, slot(src), block_layout(src)) is False
    bf16 = caches(torch.bfloat16)
    path = write(tmp_path / "c.kvb", [c[:, 0] for c in bf16])
    assert read_block_file(path, slot(src), block_layout(src)) is False


def test_read_block_file_missing_raises(tmp_path: Path) -> None:
    src = caches()
    with pytest.raises(OSError):
        read_block_file(tmp_path / "gone.kvb", slot(src), block_layout(src))


@pytest.mark.parametrize("per_chunk", [1, 2, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device_copy", [False, True])
def test_loader_copies_the_accepted_blocks(
    tmp_path: Path, per_chunk: int, dtype: torch.dtype, device_copy: bool
) -> None:
    """device_copy: the path of a device cache (each chunk copied to a buffer beside the cache,
    scattered from there), run on the host."""
    src = caches(dtype, seed=1)
    dst = caches(dtype, blocks=16, seed=2)
    want = [c.clone() for c in dst]
    src_ids, dst_ids = [5, 0, 7, 3, 9, 1, 2], [2, 3, 4, 10, 15, 0, 8]
    paths = [write(tmp_path / f"{i}.kvb", [c[:, i] for c in src]) for i in src_ids]
    paths[3].write_bytes(paths[3].read_bytes()[:-5])  # corrupt: not copied
    paths[5].unlink()  # missing: not copied
    refused = {6}  # intact but not accepted (e.g. its request failed before): not copied
    seen: list[tuple[int, ReadResult]] = []

    def accept(i: int, result: ReadResult) -> bool:
        seen.append((i, result))
        return result is True and i not in refused

    for i, (s, d) in enumerate(zip(src_ids, dst_ids, strict=True)):
        if i not in (3, 5, 6):
            for w, c in zip(want, src, strict=True):
                w[:, d] = c[:, s]
    loader = BlockFileLoader(
        dst, pin=False, chunk_bytes=per_chunk * block_layout(dst).payload_bytes, readers=3
    )
    loader.on_host = not device_copy
    try:
        loader.load(list(zip(dst_ids, paths, strict=True)), accept)
        loader.load([], accept)
    finally:
        loader.close()
    assert [i for i, _ in seen] == list(range(len(src_ids)))
    assert [r for _, r in seen][3] is False
    assert isinstance(seen[5][1], OSError)
    for got, w in zip(dst, want, strict=True):
        assert torch.equal(got, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_block_bytes_are_the_format(dtype: torch.dtype) -> None:
    """The pieces joined are the file format byte for byte (written out here), whether the layers
    are views into a block-major or a layer-major gather."""
    import json

    import xxhash

    from hallm.core.kv_connectors.blocks import HEADER, MAGIC, encode_block_parts

    src = caches(dtype)
    for layers in ([c[:, 4] for c in src], [c.transpose(0, 1).contiguous()[4] for c in src]):
        payload = b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in layers)
        desc = json.dumps({"dtype": str(dtype), "shapes": [list(t.shape) for t in layers]}).encode()
        want = HEADER.pack(MAGIC, len(payload), xxhash.xxh3_64_intdigest(payload), len(desc)) + desc + payload
        assert b"".join(encode_block_parts(layers)) == want
        assert encode_block(layers) == want
