"""Launched steps and their results: `StepHandle` (one step) and `InFlightSteps` (the queue).

A step's sampled ids (and logprobs) are copied to the host behind the step, without waiting;
`StepHandle.get()` waits for those copies alone. Steps resolve strictly in launch order: resolving
a step hands its sampled ids to the request states (`resolve_pending`) that the next steps build
on, so the queue, not the caller, decides what resolves first.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

import torch

from hallm.core.outputs import ModelRunnerOutput
from hallm.platforms import Platform

if TYPE_CHECKING:
    from hallm.core.input_batch import CachedRequestState


class _SyncDevice:
    """Marker: no event could be recorded; resolving synchronizes the device."""


_SYNC_DEVICE = _SyncDevice()


class InFlightSteps:
    """The launched steps not yet resolved, oldest first."""

    def __init__(self, device: torch.device, platform: Platform) -> None:
        self.device = device
        self.platform = platform
        self._steps: deque[StepHandle] = deque()

    def __len__(self) -> int:
        return len(self._steps)

    def newest(self) -> StepHandle | None:
        return self._steps[-1] if self._steps else None

    def launched(self, handle: StepHandle) -> None:
        """Queue a step whose work (its host copies last) has all been issued."""
        handle._event = self._record_event()
        self._steps.append(handle)

    def _record_event(self) -> Any:
        """An event after the step's host copies, or None where the step is already done (CPU)
        or the device has no events (then resolving synchronizes the device)."""
        if self.device.type == "cpu":
            return None
        try:
            event = torch.Event(device=self.device)
            event.record()
            return event
        except Exception:
            return _SYNC_DEVICE

    def resolve_until(self, handle: StepHandle) -> None:
        """Resolve the launched steps in order, up to and including `handle`."""
        while self._steps and not handle.resolved:
            h = self._steps.popleft()
            if h._event is _SYNC_DEVICE:
                self.platform.synchronize()
            elif h._event is not None:
                h._event.synchronize()
            h._finish()

    def resolve_all(self) -> None:
        if self._steps:
            self.resolve_until(self._steps[-1])

    def resolve_all_but_newest(self) -> None:
        if len(self._steps) > 1:
            self.resolve_until(self._steps[-2])


class StepHandle:
    """A launched step. `get()` waits for its host copies (once) and returns its output; the
    sampled ids then also become the known tokens of the runner's request states."""

    def __init__(self, in_flight: InFlightSteps | None) -> None:
        self.in_flight = in_flight
        self.output = ModelRunnerOutput(sampled_token_ids={})
        self.resolved = False
        self.sampled: torch.Tensor | None = None  # on the device; the next step may read it
        self.sample_states: list[CachedRequestState] = []
        self.sampled_slot = 0
        self.lp_slot: int | None = None
        self.prompt_slots: list[tuple[str, int]] = []
        self._host: list[torch.Tensor] = []
        self._event: Any = None

    @classmethod
    def done(cls, output: ModelRunnerOutput) -> StepHandle:
        h = cls(None)
        h.output = output
        h.resolved = True
        return h

    def add_host(self, *tensors: torch.Tensor) -> int:
        """Start copying tensors to the host (behind the step); returns the first one's slot."""
        slot = len(self._host)
        self._host.extend(t.to("cpu", non_blocking=True) for t in tensors)
        return slot

    def get(self) -> ModelRunnerOutput:
        if not self.resolved:
            assert self.in_flight is not None  # only `done()` handles lack a queue, and they are resolved
            self.in_flight.resolve_until(self)
        return self.output

    def _finish(self) -> None:
        host = [t.tolist() for t in self._host]
        out = self.output
        for req_id, slot in self.prompt_slots:
            out.prompt_logprobs[req_id] = (host[slot], host[slot + 1], host[slot + 2])
        if self.sample_states:
            tokens = host[self.sampled_slot]
            lp = None
            if self.lp_slot is not None:
                lp = host[self.lp_slot], host[self.lp_slot + 1], host[self.lp_slot + 2]
            for j, st in enumerate(self.sample_states):
                token = tokens[j]
                st.resolve_pending(token)
                out.sampled_token_ids[st.req_id] = token
                if lp is not None and st.params.logprobs is not None:
                    k = st.params.logprobs + 1
                    out.logprobs[st.req_id] = (lp[0][j][:k], lp[1][j][:k], lp[2][j])
        self.resolved = True
        self._host = []
        self.sampled = None
        self.sample_states = []
