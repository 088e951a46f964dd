"""The engine flags every model-running command shares (vLLM's names where they exist)."""

from __future__ import annotations

import argparse

from hallm.entrypoints.cli.common import add_device_arg


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct)",
    )
    add_device_arg(parser)
    g = parser.add_argument_group("engine")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    g.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (default: auto)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default: 16)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one step (default: 256)")
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="token budget of one step (default: the device's; cuda 8192, cpu max-model-len within [2048, 8192])",
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="fraction of device memory hallm may use (default: 0.9)",
    )
    g.add_argument(
        "--num-gpu-blocks-override", type=int, default=None, help="fix the number of KV-cache blocks"
    )
    g.add_argument(
        "--kv-cache-memory-bytes",
        type=int,
        default=None,
        help="the KV cache's size in bytes (default: the free memory under --gpu-memory-utilization; a device "
        "whose memory is shared, such as the CPU, caps it at a fixed default: 4 GiB)",
    )
    g.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse KV of shared prefixes (default: on)",
    )
    g.add_argument("--seed", type=int, default=0, help="engine seed (default: 0)")
    g.add_argument("--load-format", default="auto", help="auto | safetensors | gguf | dummy (random weights)")
    g.add_argument("--attention-backend", default=None, help="force an attention backend by name")
    g.add_argument("--enforce-eager", action="store_true", help="never capture device graphs")
    g.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="prepare the next step while the device runs this one (default: on for every device but the CPU)",
    )
    g.add_argument(
        "--skip-tokenizer-init", action="store_true", help="load no tokenizer: token ids in and out"
    )
    g.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=1,
        help="split the model across this many devices (default: 1)",
    )
    g.add_argument(
        "--distributed-executor-backend",
        default=None,
        help="uni | mp | ray: how the ranks run (default: uni for one rank, mp for more)",
    )
    g.add_argument("--served-model-name", default=None, help="model name reported to clients")
    g.add_argument(
        "--kv-transfer-config",
        default=None,
        metavar="JSON",
        help='a KV connector, e.g. \'{"kv_connector": "shared_storage", "kv_role": "kv_both", '
        '"kv_connector_extra_config": {"shared_storage_path": "/tmp/kv"}}\' (connectors: shared_storage, '
        "offload, and those of plugins)",
    )


def engine_args_from(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from hallm.core.engine_args import EngineArgs

    return EngineArgs(
        model=args.model,
        tokenizer=args.tokenizer,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
        num_gpu_blocks_override=args.num_gpu_blocks_override,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        enable_prefix_caching=args.enable_prefix_caching,
        seed=args.seed,
        load_format=args.load_format,
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling,
        served_model_name=args.served_model_name,
        tensor_parallel_size=args.tensor_parallel_size,
        distributed_executor_backend=args.distributed_executor_backend,
        skip_tokenizer_init=args.skip_tokenizer_init,
        kv_transfer_config=args.kv_transfer_config,
    )
