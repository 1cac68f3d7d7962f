"""Qwen-Image-Edit and Qwen-Image-Edit-Plus checkpoints: which pipeline a directory holds, its
processor, and the tiny random-weight edit model the tests serve.

An edit checkpoint is a Qwen-Image pipeline plus a `Qwen2VLProcessor` (the reference images go
through the Qwen2.5-VL encoder as vision tokens); `model_index.json` names the pipeline class.
The stock processor needs torchvision for its video half; where torchvision is absent (CPU
hosts here: PyPI's torchvision is built for the CUDA torch) an images-only processor is built
from the checkpoint's own image-processor config and tokenizer and handed to `from_pretrained`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from diffusers import (
    DiffusionPipeline,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
)
from transformers import Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor

from ..base.references import EDIT, EDIT_PLUS, TEXT_TO_IMAGE

log = logging.getLogger(__name__)

PIPELINE_CLASSES: dict[str, type[Any]] = {
    TEXT_TO_IMAGE: QwenImagePipeline,
    EDIT: QwenImageEditPipeline,
    EDIT_PLUS: QwenImageEditPlusPipeline,
}
# The tiny model's vision input: 56x56 to 224x224 pixels, so a reference is 4 to 64 tokens.
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 28 * 28 * 64


class ImagesOnlyProcessor(Qwen2VLProcessor):  # type: ignore[misc]
    """`Qwen2VLProcessor` without its video processor (which needs torchvision); images and
    text are processed exactly as the stock class does."""

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def pipeline_kind(model: str) -> str:
    """ "text-to-image", "edit" or "edit-plus", from the checkpoint's `model_index.json` (a
    directory's own, or a hub id's through the hub cache); a directory without one is taken
    for text-to-image, and `from_pretrained` then says what is missing."""
    index = Path(model) / "model_index.json"
    if index.is_file():
        class_name = json.loads(index.read_text()).get("_class_name", "")
    elif Path(model).exists():
        return TEXT_TO_IMAGE
    else:
        class_name = DiffusionPipeline.load_config(model).get("_class_name", "")
    for kind, cls in PIPELINE_CLASSES.items():
        if cls.__name__ == class_name:
            return kind
    raise ValueError(
        f"model: {model} holds a {class_name!r}; this server serves "
        + ", ".join(cls.__name__ for cls in PIPELINE_CLASSES.values())
    )


def load_processor(model: str) -> Qwen2VLProcessor:
    """The checkpoint's processor (its `processor/` folder, in a directory or a hub id): the
    stock class when it loads, else the images-only one from the same files."""
    local = Path(model) / "processor"
    source, options = (str(local), {}) if local.is_dir() else (model, {"subfolder": "processor"})
    try:
        return Qwen2VLProcessor.from_pretrained(source, **options)
    except Exception as error:  # transformers raises several kinds for a missing video backend
        log.info("the stock Qwen2VLProcessor did not load (%s); using its image half", error)
    return ImagesOnlyProcessor(
        image_processor=Qwen2VLImageProcessor.from_pretrained(source, **options),
        tokenizer=Qwen2Tokenizer.from_pretrained(source, **options),
        video_processor=None,
    )


def tiny_image_processor() -> Qwen2VLImageProcessor:
    return Qwen2VLImageProcessor(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)


def make_edit_model(directory: Path, kind: str, write_tokenizer: Any) -> None:
    """Turns the text-to-image pipeline saved in `directory` into an edit checkpoint of `kind`:
    the same components (the text encoder already has a small vision tower), the edit class in
    `model_index.json`, and a `processor/` folder as the real releases ship one.

    `write_tokenizer(path)` writes the tokenizer files (the tiny model's byte-level one).
    """
    index_path = directory / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = PIPELINE_CLASSES[kind].__name__
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    processor = directory / "processor"
    write_tokenizer(processor)
    tiny_image_processor().save_pretrained(processor)
