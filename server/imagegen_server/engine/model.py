"""Loading a Qwen-Image pipeline the way real deployments do.

`QwenImagePipeline.from_pretrained` (or the edit class `model_index.json` names) on a local
directory or hub id, base LoRAs through
`load_lora_weights` (optionally fused into the weights), and the scheduler either as shipped or
with the Qwen-Image-Lightning settings. The engine then uses the components, never `pipe(...)`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
from diffusers.utils import logging as diffusers_logging
from transformers import Qwen2Tokenizer

from ..base.references import MAX_REFERENCE_IMAGES, TEXT_TO_IMAGE
from .edit_model import PIPELINE_CLASSES, load_processor, pipeline_kind
from .sampling import LIGHTNING_SCHEDULER_OVERRIDES
from .tiny_model import PRESETS, RANDOM_WEIGHTS_FILE, build_pipeline, draw_modulation

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BaseLora:
    """A LoRA applied to every request (setting `lora`), fused into the weights by default."""

    path: Path  # the adapter file
    scale: float  # multiplier of its delta

    @classmethod
    def parse(cls, spec: str) -> BaseLora:
        """`PATH` or `PATH@SCALE`."""
        path, _, scale = spec.rpartition("@") if "@" in spec else (spec, "", "1.0")
        try:
            return cls(Path(path), float(scale))
        except ValueError:
            raise ValueError(f"lora: bad scale in {spec!r}; expected PATH or PATH@SCALE") from None


@dataclass(slots=True)
class LoadedModel:
    pipeline: QwenImagePipeline  # its components run (never called whole); or an edit class
    name: str  # what --model named
    device: torch.device  # where every component lives
    dtype: torch.dtype  # the pipeline was loaded in
    scheduler_preset: str  # "default", or "lightning" (`lightning_scheduler`)
    fused_loras: list[str] = field(default_factory=list)  # names of base LoRAs in the weights
    kind: str = TEXT_TO_IMAGE  # or "edit", "edit-plus": the pipeline class (base.references)

    @property
    def max_reference_images(self) -> int:
        return MAX_REFERENCE_IMAGES[self.kind]

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipeline.vae_scale_factor)

    @property
    def size_multiple(self) -> int:
        # The VAE downsamples by vae_scale_factor and latents are packed in 2x2 patches.
        return self.vae_scale_factor * 2

    @property
    def latent_channels(self) -> int:
        return int(self.pipeline.transformer.config.in_channels) // 4

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return dict(self.pipeline.scheduler.config)


def resolve_device(name: str) -> torch.device:
    """The torch device for a `--device` name. A CUDA device always carries its index:
    `torch.cuda.set_device` refuses a bare "cuda"."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} asked for but CUDA is not available")
    index = torch.cuda.current_device() if device.index is None else device.index
    return torch.device("cuda", index)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def lightning_scheduler(base: FlowMatchEulerDiscreteScheduler) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler.from_config(
        {**base.config, **LIGHTNING_SCHEDULER_OVERRIDES}
    )


def load_model(
    model: str,
    device: str = "auto",
    dtype: str = "auto",
    scheduler_preset: str = "default",
    loras: list[str] | None = None,
    fuse_lora: bool = True,
) -> LoadedModel:
    """Loads the pipeline onto the device, applies the scheduler preset and the base LoRAs."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    log.info("loading %s on %s as %s", model, torch_device, torch_dtype)
    # Loading progress bars are noise in a server log.
    diffusers_logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    kind = pipeline_kind(model)
    if (Path(model) / RANDOM_WEIGHTS_FILE).is_file():
        pipeline = random_pipeline(Path(model), torch_device, torch_dtype)
    else:
        pipeline = _from_pretrained(model, kind, torch_dtype)
        pipeline.to(torch_device)
    pipeline.set_progress_bar_config(disable=True)
    if scheduler_preset == "lightning":
        pipeline.scheduler = lightning_scheduler(pipeline.scheduler)
    loaded = LoadedModel(pipeline, model, torch_device, torch_dtype, scheduler_preset, kind=kind)
    if loras:
        _apply_base_loras(loaded, [BaseLora.parse(spec) for spec in loras], fuse_lora)
    return loaded


def _from_pretrained(model: str, kind: str, dtype: torch.dtype) -> Any:
    """The pipeline class `kind` names, from `model`; an edit checkpoint's processor is loaded
    here (`edit_model.load_processor`) so that hosts without torchvision load it too."""
    components: dict[str, Any] = {}
    if kind != TEXT_TO_IMAGE:
        components["processor"] = load_processor(model)
    return PIPELINE_CLASSES[kind].from_pretrained(model, dtype=dtype, **components)


def random_pipeline(directory: Path, device: torch.device, dtype: torch.dtype) -> QwenImagePipeline:
    """A pipeline of random weights drawn directly on `device` in `dtype`, from the configs and
    marker `tiny-model --preset full` writes: no weights on disk, no trip through host memory.

    Raises:
        ValueError: the full-size model asked for on a CPU.
    """
    recipe = json.loads((directory / RANDOM_WEIGHTS_FILE).read_text())
    if recipe["preset"] == "full" and device.type != "cuda":
        raise ValueError(
            "model: the full-size random Qwen-Image (about 57 GB in bfloat16) needs a CUDA device;"
            f" this server has {device}. Use the tiny or bench preset on CPU."
        )
    tokenizer = Qwen2Tokenizer.from_pretrained(directory / "tokenizer")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            pipeline = build_pipeline(PRESETS[recipe["preset"]], tokenizer, recipe["seed"])
    finally:
        torch.set_default_dtype(previous)
    # Small non-zero modulation: 60 random blocks in bfloat16 stay finite and each does real
    # work, so the stand-in's images test the blocks' maths (tests/unit/test_full_preset.py).
    draw_modulation(pipeline.transformer, recipe["seed"])
    return pipeline


def _apply_base_loras(model: LoadedModel, loras: list[BaseLora], fuse: bool) -> None:
    pipeline = model.pipeline
    names = []
    for index, lora in enumerate(loras):
        if not lora.path.is_file():
            raise FileNotFoundError(f"lora: file not found: {lora.path}")
        name = f"base{index}_{lora.path.stem}"
        pipeline.load_lora_weights(str(lora.path), adapter_name=name)
        names.append(name)
    pipeline.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
    if fuse:
        pipeline.fuse_lora(adapter_names=names, lora_scale=1.0)
        # Drop the LoRA layers but keep the fused weights: steps cost what the base model costs.
        pipeline.unload_lora_weights()
    model.fused_loras = [f"{lora.path.name}@{lora.scale:g}" for lora in loras] if fuse else []
    log.info("base LoRAs %s %s", names, "fused" if fuse else "active on every row")
