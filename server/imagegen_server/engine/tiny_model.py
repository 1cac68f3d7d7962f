"""A deterministic random-weight Qwen-Image pipeline, written in diffusers format.

No model hub is reachable here, so tests, `make run` and the CPU benchmarks use a pipeline this
module builds from a fixed seed: the real classes (Qwen2.5-VL text encoder, byte-level Qwen2
tokenizer, QwenImage transformer, Qwen-Image VAE, FlowMatch scheduler) at tiny sizes, saved with
`save_pretrained` and loaded back through the same `QwenImagePipeline.from_pretrained` path as
real weights. It also writes LoRA adapters in the two formats the server accepts: Kohya
(`lora_down`/`lora_up`/`alpha`, as the Qwen-Image-Lightning release) and diffusers/PEFT
(`transformer.<module>.lora_A`/`lora_B`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from safetensors.torch import save_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from ..base.references import TEXT_TO_IMAGE
from .edit_model import make_edit_model

# Special tokens of the real Qwen2.5 tokenizer that the prompt template and the VL config use.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen-Image's own scheduler settings (resolution-dependent exponential shift, terminal 0.02).
QWEN_IMAGE_SCHEDULER = {
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}

# Linear layers of each transformer block that the adapters touch (a subset of Lightning's).
# The modulation layers take one vector per row ([rows, dim], not [rows, tokens, dim]), so the
# adapters cover both input shapes a LoRA layer sees.
LORA_TARGETS = (
    "img_mod.1",
    "txt_mod.1",
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "img_mlp.net.2",
    "txt_mlp.net.2",
)

# name -> (rank, Kohya alpha or None for the PEFT format, seed); the bench uses all four.
ADAPTERS: dict[str, tuple[int, float | None, int]] = {
    "ink": (4, 4.0, 101),
    "neon": (4, None, 102),
    "sepia": (2, 1.0, 103),  # alpha != rank: the delta is scaled by alpha / rank
    "pastel": (8, None, 104),
}


@dataclass(frozen=True, slots=True)
class Preset:
    """The sizes of one stand-in pipeline."""

    layers: int  # transformer blocks
    heads: int  # transformer attention heads
    head_dim: int  # per transformer head
    text_dim: int  # text encoder hidden size = transformer joint_attention_dim
    text_layers: int  # text encoder layers
    vae_base_dim: int  # the VAE's first channel width
    text_heads: int = 2  # text encoder attention heads
    text_kv_heads: int = 2  # text encoder key/value heads (grouped-query attention)
    text_intermediate: int = 0  # 0 = twice text_dim
    vocab_size: int = 0  # 0 = the byte-level tokenizer's size
    vae_dim_mult: tuple[int, ...] = (1, 2, 2, 2)  # the VAE's channel multiplier per level
    vae_res_blocks: int = 1  # residual blocks per VAE level


PRESETS = {
    # Tests: every stage in milliseconds at 64x64.
    "tiny": Preset(layers=2, heads=2, head_dim=16, text_dim=32, text_layers=2, vae_base_dim=8),
    # CPU benchmarks: a deeper, wider transformer beside a small text encoder and VAE, so that
    # denoising dominates a request's time as it does on the real model.
    "bench": Preset(layers=8, heads=4, head_dim=64, text_dim=64, text_layers=2, vae_base_dim=4),
    # Qwen-Image's real sizes (20B transformer, Qwen2.5-VL-7B text tower, its VAE) for GPU
    # throughput work without the real weights: written without weights, built on the device.
    "full": Preset(
        layers=60,
        heads=24,
        head_dim=128,
        text_dim=3584,
        text_layers=28,
        vae_base_dim=96,
        text_heads=28,
        text_kv_heads=4,
        text_intermediate=18944,
        vocab_size=152064,
        vae_dim_mult=(1, 2, 4, 4),
        vae_res_blocks=2,
    ),
}
# Presets too large to write: their weights are drawn on the serving device at load time.
WEIGHTS_AT_LOAD = {"full"}
RANDOM_WEIGHTS_FILE = "random_weights.json"


def write_tiny_model(
    directory: Path,
    preset: str = "tiny",
    seed: int = 0,
    weights_at_load: bool = False,
    pipeline_kind: str = TEXT_TO_IMAGE,
) -> Path:
    """Writes the pipeline and its adapters under `directory`; returns the directory.

    The same (preset, seed) always gives the same bytes, so tests and benchmarks are repeatable.
    With `weights_at_load` (always for "full") only configurations and the tokenizer are
    written, plus a marker: load_model then draws the weights directly on its device.
    `pipeline_kind` "edit" or "edit-plus" writes the same weights as a Qwen-Image-Edit(-Plus)
    checkpoint (`edit_model`), with its processor.

    Raises:
        ValueError: an edit model asked for with weights drawn at load.
    """
    sizes = PRESETS[preset]
    weights_at_load = weights_at_load or preset in WEIGHTS_AT_LOAD
    if weights_at_load and pipeline_kind != TEXT_TO_IMAGE:
        raise ValueError("edit models are written with their weights (presets tiny and bench)")
    directory.mkdir(parents=True, exist_ok=True)
    _write_tokenizer_files(directory / "tokenizer")
    tokenizer = Qwen2Tokenizer.from_pretrained(directory / "tokenizer")
    with torch.device("meta") if weights_at_load else contextlib.nullcontext():
        pipeline = build_pipeline(sizes, tokenizer, seed)
    if weights_at_load:
        pipeline.save_config(directory)
        for name in ("transformer", "vae"):
            getattr(pipeline, name).save_config(directory / name)
        pipeline.text_encoder.config.save_pretrained(directory / "text_encoder")
        pipeline.scheduler.save_pretrained(directory / "scheduler")
        (directory / RANDOM_WEIGHTS_FILE).write_text(json.dumps({"preset": preset, "seed": seed}))
        return directory
    pipeline.save_pretrained(directory, safe_serialization=True)
    # Keep the tokenizer as the real release ships it (vocab + merges, converted at load time)
    # rather than the tokenizer.json that save_pretrained writes.
    shutil.rmtree(directory / "tokenizer")
    _write_tokenizer_files(directory / "tokenizer")
    _write_adapters(directory / "adapters", pipeline.transformer)
    if pipeline_kind != TEXT_TO_IMAGE:
        make_edit_model(directory, pipeline_kind, _write_tokenizer_files)
    return directory


def build_pipeline(sizes: Preset, tokenizer: Qwen2Tokenizer, seed: int) -> QwenImagePipeline:
    """The pipeline at `sizes`, each component seeded; on whatever device is the default."""
    torch.manual_seed(seed)
    text_encoder = _build_text_encoder(sizes, vocab_size=sizes.vocab_size or len(tokenizer))
    torch.manual_seed(seed + 1)
    transformer = QwenImageTransformer2DModel(**transformer_config(sizes))
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLQwenImage(
        base_dim=sizes.vae_base_dim,
        z_dim=16,
        dim_mult=list(sizes.vae_dim_mult),
        num_res_blocks=sizes.vae_res_blocks,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 16,
        latents_std=[1.0] * 16,
    )
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


# The modulation layers of a stand-in drawn at load time (`draw_modulation`): their weights'
# standard deviation is this over sqrt(fan-in), so each block's shift, scale and gate are this
# fraction of the timestep embedding's size, whatever the width. Measured at the full preset's
# depth (tests/unit/test_full_preset.py): each of the 60 blocks changes the image stream by
# 1-1.5% in bfloat16 and the output stays of order one (1.0 gave 2-3%, 0.1 gave 0.2-0.3%).
MODULATION_GAIN = 0.5


def draw_modulation(transformer: QwenImageTransformer2DModel, seed: int) -> None:
    """Redraws every block's modulation layers (`img_mod.1`, `txt_mod.1`) small and non-zero.

    Default initialisation gives modulation outputs of order one, which over 60 random blocks in
    bfloat16 grow past the format's range; zeros (adaLN-Zero, as DiTs start training) keep every
    block the identity, so that an image proves nothing about the blocks' maths. Drawn from
    `seed` on the layers' own device, so a stand-in is the same on every load.
    """
    generator: torch.Generator | None = None
    for name, module in transformer.named_modules():
        if not name.endswith(("img_mod.1", "txt_mod.1")):
            continue
        weight = module.weight
        if generator is None:
            generator = torch.Generator(weight.device).manual_seed(seed)
        with torch.no_grad():
            std = MODULATION_GAIN / weight.shape[1] ** 0.5
            drawn = torch.randn(
                weight.shape, generator=generator, device=weight.device, dtype=torch.float32
            )
            weight.copy_(drawn * std)
            module.bias.zero_()


def transformer_config(sizes: Preset) -> dict[str, Any]:
    """QwenImageTransformer2DModel's arguments at `sizes` (the full preset's are the real ones)."""
    return {
        "patch_size": 2,
        "in_channels": 64,
        "out_channels": 16,
        "num_layers": sizes.layers,
        "attention_head_dim": sizes.head_dim,
        "num_attention_heads": sizes.heads,
        "joint_attention_dim": sizes.text_dim,
        "axes_dims_rope": _rope_axes(sizes.head_dim),
    }


def _write_tokenizer_files(source: Path) -> None:
    """A byte-level BPE with no merges: every UTF-8 byte is a token, plus Qwen's specials."""
    source.mkdir(parents=True, exist_ok=True)
    byte_symbols = list(bytes_to_unicode().values())
    vocab = {symbol: index for index, symbol in enumerate(byte_symbols)}
    specials = {token: len(vocab) + index for index, token in enumerate(SPECIAL_TOKENS)}
    (source / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (source / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 32768,
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "padding_side": "right",
        "extra_special_tokens": list(SPECIAL_TOKENS[1:]),
        "added_tokens_decoder": {
            str(token_id): {
                "content": token,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
                "special": True,
            }
            for token, token_id in specials.items()
        },
    }
    (source / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _build_text_encoder(sizes: Preset, vocab_size: int) -> Qwen2_5_VLForConditionalGeneration:
    heads = sizes.text_heads
    head_dim = sizes.text_dim // heads
    # The three multimodal-rope sections add up to head_dim / 2, split like Qwen2.5-VL's
    # (16, 24, 24) of 64.
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    mrope_section = [temporal, height, half - temporal - height]
    special = {token: 256 + index for index, token in enumerate(SPECIAL_TOKENS)}
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": sizes.text_dim,
            "intermediate_size": sizes.text_intermediate or sizes.text_dim * 2,
            "num_hidden_layers": sizes.text_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": sizes.text_kv_heads,
            "rope_scaling": {"type": "mrope", "mrope_section": mrope_section},
            "vocab_size": vocab_size,
            "max_position_embeddings": 4096,
            "bos_token_id": None,
            "eos_token_id": special["<|endoftext|>"],
            "pad_token_id": special["<|endoftext|>"],
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": sizes.text_dim,
        },
        vocab_size=vocab_size,
        image_token_id=special["<|image_pad|>"],
        video_token_id=special["<|video_pad|>"],
        vision_start_token_id=special["<|vision_start|>"],
        vision_end_token_id=special["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Split head_dim over (frame, height, width) like Qwen-Image's (16, 56, 56) of 128; each
    part must be even (rotary pairs)."""
    frame = max(2, head_dim // 8 // 2 * 2)
    height = (head_dim - frame) // 4 * 2
    return (frame, height, head_dim - frame - height)


def _write_adapters(directory: Path, transformer: QwenImageTransformer2DModel) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    modules = dict(transformer.named_modules())
    for name, (rank, alpha, seed) in ADAPTERS.items():
        generator = torch.Generator("cpu").manual_seed(seed)
        tensors: dict[str, torch.Tensor] = {}
        for block in range(len(transformer.transformer_blocks)):
            for target in LORA_TARGETS:
                path = f"transformer_blocks.{block}.{target}"
                layer = modules[path]
                down = (
                    torch.randn((rank, layer.in_features), generator=generator)
                    / layer.in_features**0.5
                )
                up = torch.randn((layer.out_features, rank), generator=generator) * 2.0
                if alpha is not None:  # Kohya
                    tensors[f"{path}.lora_down.weight"] = down
                    tensors[f"{path}.lora_up.weight"] = up
                    tensors[f"{path}.alpha"] = torch.tensor(float(alpha))
                else:
                    tensors[f"transformer.{path}.lora_A.weight"] = down
                    tensors[f"transformer.{path}.lora_B.weight"] = up
        save_file(
            {key: value.contiguous() for key, value in tensors.items()},
            directory / f"{name}.safetensors",
        )
