"""Logprobs: the chosen token's log probability, its rank, and the top-k alternatives.

Used for sampled tokens (`SamplingParams.logprobs`) and for prompt tokens
(`SamplingParams.prompt_logprobs`). Everything stays on the device; `tolists()` is the single
device-to-host copy a step needs.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class LogprobsTensors:
    """Logprobs of N positions, each with its chosen token first, then the top k.

    token_ids:    LongTensor [N, 1+k]  column 0 = the chosen (sampled or prompt) token, then the
                                       top k token ids in descending logprob order
    logprobs:     FloatTensor [N, 1+k] float32 log probabilities matching `token_ids`
    sampled_rank: LongTensor [N]       1-based rank of the chosen token: the number of tokens
                                       whose logprob is >= its own (vLLM's definition)
    """

    token_ids: torch.Tensor
    logprobs: torch.Tensor
    sampled_rank: torch.Tensor

    @property
    def num_positions(self) -> int:
        return self.token_ids.shape[0]

    def slice_rows(self, start: int, end: int) -> LogprobsTensors:
        """Rows [start, end) (views, no copy)."""
        return LogprobsTensors(
            self.token_ids[start:end], self.logprobs[start:end], self.sampled_rank[start:end]
        )

    def tolists(self) -> tuple[list[list[int]], list[list[float]], list[int]]:
        """Host copies as Python lists: (token_ids, logprobs, ranks). One sync per tensor."""
        return (
            self.token_ids.cpu().tolist(),
            self.logprobs.cpu().tolist(),
            self.sampled_rank.cpu().tolist(),
        )


def compute_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the vocabulary in float32: [N, V] -> [N, V]."""
    return torch.log_softmax(logits.to(torch.float32), dim=-1)


def gather_logprobs(logprobs: torch.Tensor, num_logprobs: int, token_ids: torch.Tensor) -> LogprobsTensors:
    """Pick the chosen tokens' logprobs and ranks, plus the top `num_logprobs`, from [N, V] logprobs.

    logprobs:  [N, V] float32 normalized log probabilities
    token_ids: [N]    the chosen token per row
    """
    if num_logprobs < 0:
        raise ValueError(f"num_logprobs must be >= 0, got {num_logprobs}")
    token_ids = token_ids.to(device=logprobs.device, dtype=torch.long).unsqueeze(-1)  # [N, 1]
    chosen = logprobs.gather(-1, token_ids)  # [N, 1]
    # Rank = how many tokens are at least as likely, so the argmax has rank 1 (ties share it).
    ranks = (logprobs >= chosen).sum(dim=-1)  # [N]
    if num_logprobs == 0:
        return LogprobsTensors(token_ids, chosen, ranks)
    k = min(num_logprobs, logprobs.shape[-1])
    top_values, top_ids = torch.topk(logprobs, k, dim=-1)  # [N, k], sorted descending
    return LogprobsTensors(
        torch.cat((token_ids, top_ids), dim=1),
        torch.cat((chosen, top_values), dim=1),
        ranks,
    )


def compute_prompt_logprobs(logits: torch.Tensor, target_token_ids: torch.Tensor, k: int) -> LogprobsTensors:
    """Logprobs of prompt tokens: row t of `logits` predicts `target_token_ids[t]`.

    logits:           [T, V] the model's logits at prompt positions (any float dtype)
    target_token_ids: [T]    the prompt token that follows each position
    k:                       number of top alternatives per position (0: only the target)
    Returns LogprobsTensors with token_ids/logprobs [T, 1+k] and sampled_rank [T] (the target's rank).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, V], got shape {tuple(logits.shape)}")
    if target_token_ids.shape != (logits.shape[0],):
        raise ValueError(
            f"target_token_ids must be [T]={logits.shape[0]}, got shape {tuple(target_token_ids.shape)}"
        )
    return gather_logprobs(compute_logprobs(logits), k, target_token_ids)
