"""The attention-kernel benchmark (bench/attention.py): the padded call it times computes what a
padded batch computes, every backend either runs or says why not, and the report's arithmetic."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root holds bench/

from diffusers.models.attention_dispatch import dispatch_attention_fn

from bench.attention import (
    JointAttention,
    measure_attention,
    padding_mask,
    summary_lines,
)

CPU = torch.device("cpu")
CALL = JointAttention("64x64", image_tokens=16, text_tokens=24, heads=2, head_dim=8)


def test_padded_rows_keep_their_own_text_and_every_image_token() -> None:
    mask = padding_mask(CALL, CPU)
    assert mask.shape == (CALL.rows, 1, 1, CALL.tokens) and mask.dtype == torch.bool
    assert CALL.text_lengths() == [24, 21, 18, 15]
    for row, length in enumerate(CALL.text_lengths()):
        kept = mask[row, 0, 0]
        assert kept[:length].all() and not kept[length : CALL.text_tokens].any()
        assert kept[CALL.text_tokens :].all()


def test_the_padded_call_equals_each_row_attending_over_its_own_tokens_alone() -> None:
    """So the timed call is the one a batch of prompts of different lengths makes."""
    generator = torch.Generator().manual_seed(0)
    shape = (CALL.rows, CALL.tokens, CALL.heads, CALL.head_dim)
    query, key, value = (torch.randn(shape, generator=generator) for _ in range(3))
    padded = dispatch_attention_fn(query, key, value, attn_mask=padding_mask(CALL, CPU))
    for row, length in enumerate(CALL.text_lengths()):
        own = torch.cat([torch.arange(length), torch.arange(CALL.text_tokens, CALL.tokens)])
        alone = dispatch_attention_fn(
            query[row : row + 1], key[row : row + 1, own], value[row : row + 1, own]
        )
        assert torch.allclose(padded[row : row + 1], alone, atol=1e-5)


def test_each_backend_is_timed_or_says_why_it_cannot_run() -> None:
    points = measure_attention([CALL], CPU, torch.float32, rounds=1)
    by_key = {(point["backend"], point["padded"]): point for point in points}
    assert len(by_key) == len(points) == 10  # five backends, with and without a mask
    for point in points:
        assert ("ms" in point) != ("error" in point)
        if "ms" in point:
            assert point["tflops"] == pytest.approx(CALL.flops / (point["ms"] / 1000) / 1e12)
    # SDPA on a CPU runs both, and names the kernel it picks.
    assert "ms" in by_key["native", False] and "ms" in by_key["native", True]
    assert by_key["native", True]["kernel"] != "unknown"
    # The flash backend takes no mask: what makes padding cost something on a GPU.
    assert "attn_mask" in by_key["_native_flash", True]["error"]


def test_the_report_counts_padding_once_per_block_and_names_what_cannot_run() -> None:
    points = [
        {"resolution": "1024x1024", "backend": backend, "padded": padded, **timing}
        for backend, padded, timing in [
            ("native", False, {"ms": 2.0, "tflops": 400.0, "kernel": "flash_attention"}),
            ("native", True, {"ms": 3.0, "tflops": 270.0, "kernel": "efficient_attention"}),
            ("_native_cudnn", False, {"ms": 1.8, "tflops": 440.0}),
            ("_native_cudnn", True, {"ms": 2.2, "tflops": 360.0}),
            ("_native_math", False, {"error": "out of memory"}),
            ("_native_math", True, {"error": "out of memory"}),
        ]
    ]
    lines = summary_lines({"layers": 60, "rows": 4, "points": points}, {"1024x1024": 600.0})
    text = "\n".join(lines)
    assert "| 1024x1024 | native (flash_attention / efficient_attention) | 2 |" in text
    assert text.count("| 1024x1024 |") == 2  # the math backend ran nowhere: no row of its own
    assert "| +60.0 |" in text and "| +24.0 |" in text  # 60 blocks x (padded - no mask)
    assert "Cannot run on this device: `_native_math`." in text
    assert "padding adds +60.0 ms to a 4-row step with the default backend (10.0% of" in text
    assert "the fastest with padding is `_native_cudnn` (2.2 ms a call against 3)" in text


def test_the_engine_benchs_prompts_all_have_one_length(tiny_model: Path) -> None:
    """So no call of the MFU sweep is padded, whatever numbers its requests get."""
    from imagegen_server.engine.model import load_model
    from imagegen_server.engine.prompts import PromptTokenizer

    from bench.limit import _prompt

    count = PromptTokenizer(load_model(str(tiny_model), device="cpu").pipeline).count
    assert {count(_prompt(number)) for number in (0, 9, 10, 99, 100, 12345, 999999)} == {168}
