"""Prompt encoding: batched over rows, cached by prompt text, masks kept per prompt.

Each prompt's embedding is stored unpadded ([tokens, dim]); a batch pads them to its longest
prompt and passes the padding mask (if any row is padded) to the transformer, so a row's result
does not depend on the other prompts in its batch. The template and the dropped system-prompt
prefix are the pipeline's own (`QwenImagePipeline.prompt_template_encode` /
`prompt_template_encode_start_idx`).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

import torch
from diffusers import QwenImagePipeline

from ..base.config import MAX_TEXT_TOKENS
from ..base.engine_api import PromptCacheStats

# Qwen-Image-Edit's template shows the text encoder its one picture here.
VISION_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"


def text_template(pipeline: QwenImagePipeline) -> str:
    """The pipeline's prompt template for text alone. An edit pipeline's rows without pictures
    (the warm-up, the probes) and its prompt limit use it without the picture placeholder:
    Qwen-Image-Edit's template less that block is Edit-Plus's, and both drop the same prefix."""
    template: str = pipeline.prompt_template_encode
    return template.replace(VISION_BLOCK, "")


class PromptTokenizer:
    """Counts a prompt's tokens as the text encoder will see them (for request validation)."""

    def __init__(self, pipeline: QwenImagePipeline) -> None:
        # A private copy: a fast tokenizer is not safe to share with the engine thread.
        self._tokenizer = copy.deepcopy(pipeline.tokenizer)
        self._template = text_template(pipeline)
        self._drop = pipeline.prompt_template_encode_start_idx

    def count(self, prompt: str) -> int:
        ids = self._tokenizer(self._template.format(prompt), add_special_tokens=True).input_ids
        return max(0, len(ids) - int(self._drop))


class PromptEncoder:
    """Turns texts, prompts and negative prompts alike, into text-encoder hidden states. Runs
    on the engine thread only.

    Every text is cut at `max_tokens`, as the pipeline cuts at `max_sequence_length` after
    encoding. The engine passes the larger of the two fields' limits (each at most
    MAX_TEXT_TOKENS, the pipeline's own), and validation refuses a text longer than its own
    field's limit (counted by `PromptTokenizer`, the same template), so the cut takes nothing
    from a served text.
    """

    def __init__(self, pipeline: QwenImagePipeline, cache_size: int, max_tokens: int) -> None:
        self._tokenizer = pipeline.tokenizer
        self._text_encoder = pipeline.text_encoder
        self._template = text_template(pipeline)
        self._drop = pipeline.prompt_template_encode_start_idx
        self._max_tokens = min(max_tokens, MAX_TEXT_TOKENS)
        self._tokenizer_max_length = pipeline.tokenizer_max_length + self._drop
        self.stats = PromptCacheStats()
        self._cache: EmbeddingCache[str] = EmbeddingCache(cache_size, self.stats)

    @property
    def max_tokens(self) -> int:
        """The most text tokens any row's states can have, prompt or negative (what the
        transformer's text length, and so compiled shapes and memory, must allow for)."""
        return self._max_tokens

    @torch.no_grad()
    def encode(
        self, texts: Sequence[str], device: torch.device, dtype: torch.dtype
    ) -> list[torch.Tensor]:
        """Returns one [tokens, dim] tensor per text; uncached texts share one encoder call."""
        return self._cache.resolve(texts, lambda missing: self._run_encoder(missing, device, dtype))

    def _run_encoder(
        self, texts: list[str], device: torch.device, dtype: torch.dtype
    ) -> list[torch.Tensor]:
        tokens = self._tokenizer(
            [self._template.format(text) for text in texts],
            max_length=self._tokenizer_max_length,
            padding=True,
            padding_side="right",
            truncation=True,
            return_tensors="pt",
        ).to(device)
        # The language model alone: its last hidden state is the pipeline's hidden_states[-1],
        # and the LM head's logits (every token x a 152k vocabulary: gigabytes for a batch of
        # long prompts on the full model), every layer's states and a KV cache are never built.
        hidden = self._text_encoder.model(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            use_cache=False,
        ).last_hidden_state
        lengths = tokens.attention_mask.sum(dim=1).tolist()
        # A copy, not a view: a view would keep the whole batch's hidden states (every row,
        # padded to the longest) alive for as long as the entry stays cached.
        return [
            hidden[row, self._drop : length][: self._max_tokens].to(dtype=dtype, copy=True)
            for row, length in enumerate(lengths)
        ]


K = TypeVar("K", bound=Hashable)


class EmbeddingCache(Generic[K]):
    """Text-encoder states by key, least recently used first out; counts hits and misses."""

    def __init__(self, size: int, stats: PromptCacheStats) -> None:
        self._entries: OrderedDict[K, torch.Tensor] = OrderedDict()
        self._size = size  # entries kept; 0 = no caching
        self._stats = stats  # shared by every cache of the engine (one metric)

    def resolve(
        self, keys: Sequence[K], compute: Callable[[list[K]], list[torch.Tensor]]
    ) -> list[torch.Tensor]:
        """One tensor per key; the keys not cached go to `compute` together, in one call."""
        found = {key: self._lookup(key) for key in dict.fromkeys(keys)}
        missing = [key for key, value in found.items() if value is None]
        self._stats.hits += len(keys) - len(missing)
        self._stats.misses += len(missing)
        if missing:
            for key, value in zip(missing, compute(missing), strict=True):
                found[key] = value
                self._store(key, value)
        return [found[key] for key in keys]  # type: ignore[misc]

    def _lookup(self, key: K) -> torch.Tensor | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def _store(self, key: K, value: torch.Tensor) -> None:
        if self._size <= 0:
            return
        self._entries[key] = value
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


def pad_embeddings(
    embeddings: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stacks [tokens_i, dim] tensors into [B, max_tokens, dim] plus a [B, max_tokens] mask.

    The mask is None when every prompt has the same length, as QwenImagePipeline does: with
    nothing to mask, SDPA can pick its flash kernel, which takes no mask. The lengths are known
    here on the host, so deciding this costs no device sync.
    """
    longest = max(embedding.shape[0] for embedding in embeddings)
    first = embeddings[0]
    if all(embedding.shape[0] == longest for embedding in embeddings):
        return torch.stack(list(embeddings)), None
    batch = first.new_zeros((len(embeddings), longest, first.shape[1]))
    mask = torch.zeros((len(embeddings), longest), dtype=torch.long, device=first.device)
    for row, embedding in enumerate(embeddings):
        batch[row, : embedding.shape[0]] = embedding
        mask[row, : embedding.shape[0]] = 1
    return batch, mask
