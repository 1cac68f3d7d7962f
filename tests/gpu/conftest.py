"""GPU tests: each carries `@pytest.mark.gpu` (checked here), and they skip cleanly without CUDA
(CI has no GPU)."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    unmarked = [
        item.nodeid
        for item in items
        if "tests/gpu/" in str(item.fspath) and item.get_closest_marker("gpu") is None
    ]
    if unmarked:
        raise pytest.UsageError(f"GPU tests without @pytest.mark.gpu: {unmarked}")
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
