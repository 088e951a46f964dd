"""The public API of a plugin that brings its own worker (`Platform.worker_class()`).

A device whose runtime is not torch (hallm-tpu's JAX worker) replaces the core's `Worker` and
`ModelRunner`, not the engine: it receives the scheduler's `SchedulerOutput` each step and
returns the `ModelRunnerOutput` the core's runner returns, keeps per-request state in
`CachedRequestState` and the step's host arrays in `StepBuffers` (block tables, slot mapping,
positions exactly as the core lays them out), samples with the core's `Sampler` (so sampling
parameters, seeds and logprobs behave identically on every device) and loads weights through the
core's loader (safetensors, GGUF, dummy) before converting them to its own arrays.

These names are the contract for such a worker, versioned with the plugin API
(`hallm.platforms.API_VERSION`); a plugin imports them from here, never from `hallm.core`.
"""

from __future__ import annotations

from hallm.core.config import EngineConfig
from hallm.core.input_batch import CachedRequestState, StepBuffers
from hallm.core.model_loader import load_model
from hallm.core.model_runner import step_seed
from hallm.core.models.llama import LlamaForCausalLM
from hallm.core.outputs import ModelRunnerOutput
from hallm.core.prompt_logprobs import PromptLogprobSpan, prompt_logprob_spans
from hallm.core.sampler import RequestSamplingState, Sampler, SamplingMetadata, compute_prompt_logprobs
from hallm.core.scheduler_output import SchedulerOutput

__all__ = [
    "CachedRequestState",
    "EngineConfig",
    "LlamaForCausalLM",
    "ModelRunnerOutput",
    "PromptLogprobSpan",
    "RequestSamplingState",
    "Sampler",
    "SamplingMetadata",
    "SchedulerOutput",
    "StepBuffers",
    "compute_prompt_logprobs",
    "load_model",
    "prompt_logprob_spans",
    "step_seed",
]
