"""EngineArgs: the user-facing engine options (the offline API's keywords, the CLI's flags),
checked and turned into an EngineConfig."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from hallm.core.config import (
    DTYPE_CHOICES,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    check_fraction,
    check_positive,
)
from hallm.core.kv_connectors import check_kv_transfer, parse_kv_transfer_config
from hallm.platforms import ConfigError

logger = logging.getLogger("hallm.engine")

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")


@dataclasses.dataclass
class EngineArgs:
    model: str | None = None
    tokenizer: str | None = None
    device: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    kv_cache_memory_bytes: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    seed: int = 0
    load_format: str = "auto"
    attention_backend: str | None = None
    enforce_eager: bool = False
    # None: on where the device runs asynchronously to the host (any device but the CPU).
    async_scheduling: bool | None = None
    tensor_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    served_model_name: str | None = None
    skip_tokenizer_init: bool = False  # token ids in and out only (benchmarks with dummy weights)
    # vLLM's shape: {"kv_connector": NAME, "kv_role": "kv_producer" | "kv_consumer" | "kv_both",
    # "kv_connector_extra_config": {...}}, as a dict or a JSON string.
    kv_transfer_config: dict[str, Any] | str | None = None

    def validate(self) -> None:
        if not isinstance(self.dtype, str):
            raise ConfigError(f"dtype must be a string such as {list(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ConfigError(f"load_format must be one of {list(LOAD_FORMATS)}, got {self.load_format!r}")
        check_positive("block_size", self.block_size)
        check_positive("max_num_seqs", self.max_num_seqs)
        check_positive("max_model_len", self.max_model_len, allow_none=True)
        check_positive("max_num_batched_tokens", self.max_num_batched_tokens, allow_none=True)
        check_positive("num_gpu_blocks_override", self.num_gpu_blocks_override, allow_none=True)
        check_positive("kv_cache_memory_bytes", self.kv_cache_memory_bytes, allow_none=True)
        check_positive("tensor_parallel_size", self.tensor_parallel_size)
        check_fraction("gpu_memory_utilization", self.gpu_memory_utilization)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        parse_kv_transfer_config(self.kv_transfer_config)

    def _executor_name(self) -> str:
        """The executor: as given, else `mp` when the model is split across ranks, else `uni`."""
        tp = self.tensor_parallel_size
        name = self.distributed_executor_backend or ("mp" if tp > 1 else "uni")
        if name == "uni" and tp > 1:
            raise ConfigError(
                f"the in-process executor 'uni' runs one rank; tensor_parallel_size {tp} needs "
                "--distributed-executor-backend mp (one host) or ray (one host or more)"
            )
        return name

    def create_engine_config(self) -> EngineConfig:
        """Validate, resolve the device (once, here) and the model, and build the config."""
        from hallm.core.distributed.sharding import check_tensor_parallel
        from hallm.core.model_loader import dtype_name, resolve_dtype, resolve_model
        from hallm.platforms.registry import select_platform

        self.validate()
        source = resolve_model(self.model, self.load_format, self.tokenizer)
        choice = select_platform(self.device)
        platform = choice.platform_cls()
        caps = platform.capabilities()
        ckpt_dtype = getattr(source.hf_config, "dtype", None)
        dtype = dtype_name(resolve_dtype(self.dtype, ckpt_dtype, caps.dtypes))
        assert dtype is not None  # resolve_dtype returns one of caps.dtypes
        if self.dtype == "auto" and dtype_name(ckpt_dtype) not in (None, dtype):
            logger.info(
                "checkpoint dtype %s is not supported on %s; using %s", ckpt_dtype, choice.device_id, dtype
            )

        limit = _model_context_length(source.hf_config)
        max_model_len = self.max_model_len or limit
        if max_model_len is None:
            raise ConfigError(
                "the model's config gives no context length (max_position_embeddings); pass --max-model-len"
            )
        if limit is not None and max_model_len > limit:
            raise ConfigError(
                f"max_model_len {max_model_len} exceeds the model's context length {limit} "
                f"(max_position_embeddings in its config); pass --max-model-len <= {limit}"
            )
        max_batched = self.max_num_batched_tokens or platform.default_max_num_batched_tokens(max_model_len)
        kv_transfer = parse_kv_transfer_config(self.kv_transfer_config)
        async_scheduling = (
            caps.async_scheduling if self.async_scheduling is None else bool(self.async_scheduling)
        )
        executor = self._executor_name()
        check_tensor_parallel(source.hf_config, self.tensor_parallel_size)
        if self.tensor_parallel_size > 1:
            from hallm.core.model_loader.loader import check_splittable
            from hallm.core.models import resolve_model_class
            from hallm.platforms.registry import models as contributed_models

            check_splittable(resolve_model_class(source.hf_config, contributed_models()))
        config = EngineConfig(
            model=ModelConfig(
                model=source.model_dir,
                tokenizer=source.tokenizer_dir,
                dtype=dtype,
                max_model_len=max_model_len,
                seed=self.seed,
                load_format=source.load_format,
                hf_config=source.hf_config,
                served_model_name=self.served_model_name or source.display_name,
            ),
            cache=CacheConfig(
                block_size=self.block_size,
                gpu_memory_utilization=self.gpu_memory_utilization,
                num_gpu_blocks_override=self.num_gpu_blocks_override,
                kv_cache_memory_bytes=self.kv_cache_memory_bytes,
                enable_prefix_caching=self.enable_prefix_caching,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=max_batched,
                enable_chunked_prefill=self.enable_chunked_prefill,
                async_scheduling=async_scheduling,
            ),
            parallel=ParallelConfig(
                tensor_parallel_size=self.tensor_parallel_size,
                distributed_executor_backend=executor,
            ),
            device=choice.to_dict(),
            attention_backend=self.attention_backend,
            enforce_eager=self.enforce_eager,
            kv_transfer=kv_transfer,
        )
        check_kv_transfer(config)
        if kv_transfer is not None and platform.worker_class() is not None:
            raise ConfigError(
                f"the {choice.device_id} platform brings its own worker, which does not run KV connectors; "
                "drop --kv-transfer-config"
            )
        if not config.scheduler.enable_chunked_prefill and max_batched < max_model_len:
            raise ConfigError(
                f"without chunked prefill max_num_batched_tokens ({max_batched}) must be >= max_model_len "
                f"({max_model_len})"
            )
        platform.update_config(config)
        return config


def _model_context_length(hf_config: Any) -> int | None:
    text = getattr(hf_config, "get_text_config", None)
    if callable(text) and text() is not hf_config:  # a nested text model's context length
        found = _model_context_length(text())
        if found is not None:
            return found
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
