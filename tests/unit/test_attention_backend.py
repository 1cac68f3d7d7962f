"""`--attention-backend`: a backend that takes no mask is refused before it fails a call."""

from __future__ import annotations

import pytest
import torch
from imagegen_server.engine.acceleration import check_backend_takes_masks


@pytest.mark.parametrize("backend", ["flash", "_native_flash", "_flash_3", "sage"])
def test_a_backend_without_masks_is_refused_naming_the_setting(backend: str) -> None:
    """Qwen-Image passes a mask for padded prompts: every "buckets" call and the memory probe."""
    with pytest.raises(ValueError, match=f"attention_backend: '{backend}' takes no attention mask"):
        check_backend_takes_masks(backend, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("backend", ["native", "_native_math"])
def test_a_backend_with_masks_is_accepted(backend: str) -> None:
    check_backend_takes_masks(backend, torch.device("cpu"), torch.float32)
