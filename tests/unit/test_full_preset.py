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


def _stand_in_transformer() -> torch.nn.Module:
    """The full preset's depth (60 blocks) at a tiny width, in bfloat16 on the CPU, with its
    modulation drawn as load_model draws the full stand-in's."""
    from diffusers import QwenImageTransformer2DModel
    from imagegen_server.engine.tiny_model import Preset, draw_modulation

    narrow = Preset(
        layers=PRESETS["full"].layers,
        heads=2,
        head_dim=32,
        text_dim=32,
        text_layers=1,
        vae_base_dim=8,
    )
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(**transformer_config(narrow))
    draw_modulation(transformer, seed=0)
    return transformer.to(torch.bfloat16).eval()


def _forward_with_block_outputs(transformer: torch.nn.Module) -> tuple[torch.Tensor, list[float]]:
    """A forward on fixed random inputs; returns the output and each block's change to the
    image stream (relative RMS)."""
    changes: list[float] = []

    def record(_module: object, args: tuple, kwargs: dict, output: tuple) -> None:
        before = kwargs.get("hidden_states", args[0] if args else None)
        after = output[1]  # (text stream, image stream)
        changes.append(float((after - before).float().norm() / before.float().norm()))

    hooks = [
        block.register_forward_hook(record, with_kwargs=True)
        for block in transformer.transformer_blocks
    ]
    generator = torch.Generator().manual_seed(1)
    try:
        with torch.inference_mode():
            output = transformer(
                hidden_states=torch.randn(2, 16, 64, generator=generator).bfloat16(),
                timestep=torch.tensor([0.9, 0.3], dtype=torch.bfloat16),
                encoder_hidden_states=torch.randn(2, 7, 32, generator=generator).bfloat16(),
                encoder_hidden_states_mask=torch.ones(2, 7, dtype=torch.long),
                img_shapes=[[(1, 4, 4)]] * 2,
                return_dict=False,
            )[0]
    finally:
        for hook in hooks:
            hook.remove()
    return output, changes


def test_the_full_stand_ins_blocks_do_real_work_and_stay_finite_in_bf16() -> None:
    """What the GPU tests of the full stand-in rely on, at a width a CPU runs in a second: with
    the drawn modulation every one of the 60 blocks changes the image stream (zero gates would
    leave each the identity) and the output stays finite and of order one in bfloat16."""
    transformer = _stand_in_transformer()
    output, changes = _forward_with_block_outputs(transformer)
    assert torch.isfinite(output).all()
    assert float(output.float().abs().max()) < 100
    assert len(changes) == 60 and min(changes) > 5e-3, min(changes)
    for name, module in transformer.named_modules():  # what the stand-in drew before: zeros
        if name.endswith(("img_mod.1", "txt_mod.1")):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    _, identity = _forward_with_block_outputs(transformer)
    assert max(identity) == 0.0  # every block the identity: an image proved nothing
