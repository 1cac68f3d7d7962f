"""Instruction editing's conditioning, as diffusers' `QwenImageEditPipeline` and
`QwenImageEditPlusPipeline` compute it, batched over requests.

- Prompt states: the edit template with one vision block per reference ("Picture i: ..." for
  Edit-Plus, whose text encoder sees each reference at about 384x384; Edit shows its one
  reference at about one megapixel), through the processor and the Qwen2.5-VL encoder,
  the template's prefix dropped. The texts of all requests admitted together share one encoder
  call, padded on the right; states are cached by text plus a digest of the references.
- Reference latents: each reference resized to about one megapixel at its own aspect ratio,
  VAE-encoded (the posterior's mode), normalised and packed; a row's references follow its
  noisy latents along the sequence in every transformer call (`denoise`). The latents of the
  last few reference sets are cached by digest.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from PIL.Image import Image as PILImage

from ..base.engine_api import PromptCacheStats
from ..base.references import (
    CONDITION_IMAGE_AREA,
    EDIT_PLUS,
    VAE_IMAGE_AREA,
    ReferenceImages,
    calculate_dimensions,
)
from .decode import set_vae_tiling
from .model import LoadedModel
from .prompts import VISION_BLOCK, EmbeddingCache
from .sampling import LatentShape, pack

# Edit-Plus names each reference in the instruction (diffusers' img_prompt_template).
PICTURE_TEMPLATE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"

# Reference sets whose latents stay cached (by digest): a few megabytes each at one megapixel
# per reference, and the VAE encode they save is most of an edit's admission on a CPU.
LATENT_CACHE_ENTRIES = 16

# A text and the digest of the references it is encoded with.
PromptKey = tuple[str, str]


class ReferenceEncoder:
    """Prompt states and reference latents of edit requests; engine thread only."""

    def __init__(
        self,
        model: LoadedModel,
        cache_size: int,
        stats: PromptCacheStats,
        vae_tiling_min_pixels: int = 0,
    ) -> None:
        pipeline = model.pipeline
        self._model = model
        self._plus = model.kind == EDIT_PLUS
        self._processor = pipeline.processor
        self._text_encoder = pipeline.text_encoder
        self._template = pipeline.prompt_template_encode
        self._drop = int(pipeline.prompt_template_encode_start_idx)
        self._image_processor = pipeline.image_processor
        self._vae = pipeline.vae
        self._tiling_min_pixels = vae_tiling_min_pixels
        self._cache: EmbeddingCache[PromptKey] = EmbeddingCache(cache_size, stats)
        self._vision_token_counts: dict[tuple[int, int], int] = {}  # by picture size
        self.latent_stats = PromptCacheStats()  # hits and misses of the reference latents
        self._latents: EmbeddingCache[str] = EmbeddingCache(LATENT_CACHE_ENTRIES, self.latent_stats)

    @torch.no_grad()
    def encode_prompts(self, texts: Sequence[tuple[str, ReferenceImages]]) -> list[torch.Tensor]:
        """One [tokens, dim] tensor per (text, references); uncached ones share one call."""
        by_digest = {references.digest: references for _, references in texts}
        keys = [(text, references.digest) for text, references in texts]
        return self._cache.resolve(
            keys, lambda missing: self._run_encoder([(t, by_digest[d]) for t, d in missing])
        )

    def text_tokens(self, vae_sizes: Sequence[tuple[int, int]]) -> int:
        """The tokens references of these VAE sizes (a batch key's) add to an edit row's
        text: each picture's vision tokens and its label (what the row's memory grows with).
        Exact when the pictures' aspect ratios are their VAE sizes'; close otherwise."""
        tokens = 0
        for index, (width, height) in enumerate(vae_sizes):
            # Edit-Plus shows the encoder each picture at about 384x384, Edit at its VAE size.
            shown = (
                calculate_dimensions(CONDITION_IMAGE_AREA, width / height)
                if self._plus
                else (width, height)
            )
            label = PICTURE_TEMPLATE.format(index + 1) if self._plus else VISION_BLOCK
            # The label holds one image placeholder, which the vision tokens replace.
            tokens += len(self._processor.tokenizer(label).input_ids) - 1
            tokens += self._vision_tokens(*shown)
        return tokens

    def _vision_tokens(self, width: int, height: int) -> int:
        """A picture's vision tokens at this size, as the processor itself counts them."""
        if (width, height) not in self._vision_token_counts:
            blank = Image.new("RGB", (width, height))
            grid = self._processor.image_processor(images=[blank], return_tensors="pt")
            merge = int(self._processor.image_processor.merge_size)
            count = int(grid["image_grid_thw"].prod()) // (merge * merge)
            self._vision_token_counts[(width, height)] = count
        return self._vision_token_counts[(width, height)]

    @torch.no_grad()
    def latents(self, references: ReferenceImages) -> torch.Tensor:
        """[1, tokens, channels * 4]: every reference's packed latents, in order; cached by
        the references' digest (several instructions on one picture encode it once)."""
        found = self._latents.resolve([references.digest], lambda _: [self._encode(references)])
        return found[0]

    def _encode(self, references: ReferenceImages) -> torch.Tensor:
        return torch.cat(
            [
                self._encode_reference(image, width, height)
                for image, (width, height) in zip(
                    references.images, references.vae_sizes, strict=True
                )
            ],
            dim=1,
        )

    def _run_encoder(self, texts: list[tuple[str, ReferenceImages]]) -> list[torch.Tensor]:
        device, dtype = self._model.device, self._model.dtype
        inputs = self._processor(
            text=[self._template.format(self._picture_prefix(refs) + text) for text, refs in texts],
            images=[image for _, refs in texts for image in self._prompt_images(refs)],
            padding=True,
            padding_side="right",
            return_tensors="pt",
        ).to(device)
        # The language model alone, its last hidden state (the pipelines' hidden_states[-1]).
        hidden = self._text_encoder.model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
            use_cache=False,
        ).last_hidden_state
        lengths = inputs["attention_mask"].sum(dim=1).tolist()
        # Copies, not views: a cached view would keep the whole batch's states alive.
        return [
            hidden[row, self._drop : length].to(dtype=dtype, copy=True)
            for row, length in enumerate(lengths)
        ]

    def _picture_prefix(self, references: ReferenceImages) -> str:
        """Edit-Plus names each picture before the instruction; Edit's template holds its one."""
        if not self._plus:
            return ""
        return "".join(
            PICTURE_TEMPLATE.format(index + 1) for index in range(len(references.images))
        )

    def _prompt_images(self, references: ReferenceImages) -> list[PILImage]:
        """The pictures the text encoder sees: Edit-Plus at about 384x384 each, Edit at the
        reference's megapixel size."""
        area = CONDITION_IMAGE_AREA if self._plus else VAE_IMAGE_AREA
        resized = []
        for image in references.images:
            width, height = calculate_dimensions(area, image.width / image.height)
            resized.append(self._image_processor.resize(image, height, width))
        return resized

    def _encode_reference(self, image: PILImage, width: int, height: int) -> torch.Tensor:
        """One reference's packed, normalised latents (the VAE posterior's mode)."""
        pixels = self._image_processor.preprocess(image, height, width).unsqueeze(2)
        pixels = pixels.to(device=self._model.device, dtype=self._model.dtype)
        set_vae_tiling(self._vae, height, width, self._tiling_min_pixels)
        latents = self._vae.encode(pixels).latent_dist.mode()
        config = self._vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(config.latents_std).view(shape).to(latents.device, latents.dtype)
        normalised = (latents - mean) / std  # divided, as the edit pipelines do
        grid = LatentShape(config.z_dim, latents.shape[3], latents.shape[4])
        return pack(normalised, grid)
