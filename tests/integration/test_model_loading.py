"""Loading the real way: base LoRAs through load_lora_weights (fused or not), Lightning settings."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline
from imagegen_client import OutputFormat
from imagegen_server.engine.model import lightning_scheduler
from support import assert_same_image, pipeline_image, pixels

NPY = OutputFormat.NPY


@pytest.fixture(scope="module")
def lora_reference(tiny_model: Path) -> Any:
    """QwenImagePipeline with the Kohya-format adapter loaded the documented way."""
    pipeline = QwenImagePipeline.from_pretrained(tiny_model, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.load_lora_weights(str(tiny_model / "adapters/ink.safetensors"), adapter_name="ink")
    pipeline.set_adapters(["ink"], adapter_weights=[0.8])
    return pipeline


@pytest.mark.parametrize("fuse", [True, False])
def test_a_base_lora_applies_like_load_lora_weights(
    server_factory: Any, tiny_model: Path, lora_reference: Any, fuse: bool
) -> None:
    server = server_factory(lora=[f"{tiny_model}/adapters/ink.safetensors@0.8"], fuse_lora=fuse)
    result = server.client().generate("a fox", seed=5, output_format=NPY)
    assert_same_image(pixels(result), pipeline_image(lora_reference, "a fox", 5))
    info = server.client().server_info()
    assert list(info.fused_adapters) == (["ink.safetensors@0.8"] if fuse else [])


def test_the_base_lora_changes_the_image(
    server: Any, lora_reference: Any, reference_pipeline: Any
) -> None:
    with_lora = pipeline_image(lora_reference, "a fox", 5)
    without = pixels(server.client().generate("a fox", seed=5, output_format=NPY))
    assert float(np.abs(with_lora - without).max()) > 0.01


def test_the_lightning_preset_uses_its_scheduler_settings(
    server_factory: Any, tiny_model: Path
) -> None:
    server = server_factory(scheduler_preset="lightning", default_steps=None)
    info = server.client().server_info()
    assert info.scheduler_preset == "lightning" and info.limits.default_steps == 8
    assert info.limits.min_steps == 1  # no terminal stretch: a single step is well defined
    pipeline = QwenImagePipeline.from_pretrained(tiny_model, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.scheduler = lightning_scheduler(pipeline.scheduler)
    config = pipeline.scheduler.config
    assert config.base_shift == config.max_shift == pytest.approx(math.log(3))
    assert config.shift_terminal is None and config.time_shift_type == "exponential"
    result = server.client().generate("a fox", seed=5, output_format=NPY)
    assert_same_image(pixels(result), pipeline_image(pipeline, "a fox", 5, steps=8))
    default = pixels(
        server_factory().client().generate("a fox", seed=5, steps=8, output_format=NPY)
    )
    assert float(np.abs(default - pixels(result)).max()) > 1e-3  # the schedule really differs
