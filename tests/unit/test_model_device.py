"""`--device` names to torch devices: what CUDA calls at start-up accept."""

from __future__ import annotations

import pytest
import torch
from imagegen_server.engine.model import resolve_device


def test_a_cuda_device_always_carries_the_index_set_device_needs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch.cuda.set_device refuses a bare "cuda" (ValueError), which stopped every start on a
    GPU: the resolved device names its index."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    for name, index in (("auto", 3), ("cuda", 3), ("cuda:1", 1)):
        device = resolve_device(name)
        assert device == torch.device("cuda", index)
        # What torch.cuda.set_device reads its argument with.
        assert torch.cuda._get_device_index(device) == index
    with pytest.raises(ValueError, match=r"Expected a torch\.device with a specified index"):
        torch.cuda._get_device_index(torch.device("cuda"))  # the bare device it refuses


def test_cpu_stays_cpu_and_cuda_without_cuda_is_refused() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device: 'cuda' asked for but CUDA is not available"):
        resolve_device("cuda")
