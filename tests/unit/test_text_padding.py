"""Padding prompt states for a batch: a mask only when some prompt is shorter than another."""

from __future__ import annotations

import torch
from imagegen_server.engine.prompts import pad_embeddings


def test_prompts_of_one_length_need_no_mask() -> None:
    first, second = torch.randn(5, 8), torch.randn(5, 8)
    states, mask = pad_embeddings([first, second])
    assert mask is None  # lets SDPA choose its flash kernel on CUDA
    assert torch.equal(states, torch.stack([first, second]))


def test_shorter_prompts_are_padded_with_zeros_and_masked_out() -> None:
    short, long = torch.randn(3, 8), torch.randn(5, 8)
    states, mask = pad_embeddings([short, long])
    assert mask is not None
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert torch.equal(states[0, :3], short) and not states[0, 3:].any()
    assert torch.equal(states[1], long)
