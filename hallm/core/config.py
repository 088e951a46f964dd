"""Engine configuration: small typed dataclasses, validated where they are built.

`EngineArgs` is what a user passes (the offline API's keywords, the CLI's flags); `create()`
checks each value, resolves the device once, and returns the `EngineConfig` every process
receives as plain data.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hallm.platforms import ConfigError

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


@dataclasses.dataclass
class ModelConfig:
    """model: HF directory or .gguf file; dtype: resolved name ("float32", ...)."""

    model: str
    tokenizer: str | None
    dtype: str
    max_model_len: int
    seed: int
    load_format: str
    hf_config: Any = None  # transformers.PretrainedConfig, filled in by the loader
    served_model_name: str | None = None


@dataclasses.dataclass
class CacheConfig:
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    kv_cache_memory_bytes: int | None = None  # caps the KV pool (bytes per rank)
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"
    num_blocks: int = 0  # decided after profiling
    bytes_per_block: int = 0  # of all layers together (per rank), known after loading the model


@dataclasses.dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    # Schedule step N+1 (and prepare its inputs) while the device runs step N; see LLMEngine.step.
    async_scheduling: bool = False


@dataclasses.dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    distributed_executor_backend: str = "uni"


KV_ROLES = ("kv_producer", "kv_consumer", "kv_both")


@dataclasses.dataclass
class KVTransferConfig:
    """`--kv-transfer-config` (vLLM's JSON shape): which connector, this engine's role in the
    transfer, and the connector's own settings (e.g. {"shared_storage_path": DIR})."""

    kv_connector: str
    kv_role: str = "kv_both"
    kv_connector_extra_config: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def is_producer(self) -> bool:
        return self.kv_role in ("kv_producer", "kv_both")

    @property
    def is_consumer(self) -> bool:
        return self.kv_role in ("kv_consumer", "kv_both")


@dataclasses.dataclass
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    device: dict[str, Any]  # PlatformChoice.to_dict(): handed to child processes as plain data
    attention_backend: str | None = None
    enforce_eager: bool = False
    kv_transfer: KVTransferConfig | None = None


def check_positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < float(value) <= 1.0:
        raise ConfigError(f"{name} must be in (0, 1], got {value!r}")
