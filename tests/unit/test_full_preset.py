"""The `full` preset is Qwen-Image at its real sizes, so GPU throughput figures measured on it
stand for the real model's. Checked on the meta device: shapes without memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from imagegen_server.engine.tiny_model import (
    PRESETS,
    RANDOM_WEIGHTS_FILE,
    build_pipeline,
    transformer_config,
    write_tiny_model,
)
from transformers import Qwen2Tokenizer

# Qwen/Qwen-Image's transformer/config.json (the release's architecture).
RELEASED_TRANSFORMER = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "axes_dims_rope": (16, 56, 56),
}


@pytest.fixture(scope="module")
def full_written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("full"), preset="full")


def test_the_full_transformer_has_the_released_architecture() -> None:
    assert transformer_config(PRESETS["full"]) == RELEASED_TRANSFORMER


def test_the_full_preset_writes_configs_and_no_weights(full_written: Path) -> None:
    written = {path.name for path in full_written.rglob("*") if path.is_file()}
    assert RANDOM_WEIGHTS_FILE in written and "model_index.json" in written
    assert not [name for name in written if name.endswith((".safetensors", ".bin"))]


def test_the_full_preset_has_qwen_image_parameter_counts(full_written: Path) -> None:
    tokenizer = Qwen2Tokenizer.from_pretrained(full_written / "tokenizer")
    with torch.device("meta"):
        pipeline = build_pipeline(PRESETS["full"], tokenizer, seed=0)
    counts = {
        name: sum(p.numel() for p in getattr(pipeline, name).parameters())
        for name in ("transformer", "text_encoder", "vae")
    }
    language = sum(p.numel() for p in pipeline.text_encoder.model.language_model.parameters())
    # The 20B MMDiT, Qwen2.5-VL-7B's language model (its vision tower is left tiny: prompts are
    # text) and the 127M-parameter VAE.
    assert 20.3e9 < counts["transformer"] < 20.5e9
    assert 7.0e9 < language < 7.1e9
    assert 0.12e9 < counts["vae"] < 0.13e9
    assert 56e9 < 2 * sum(counts.values()) < 57e9  # bytes in bfloat16: "about 57 GB"
