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
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import QwenImagePipeline

# QwenImagePipeline.__call__'s default max_sequence_length; prompts past it are refused upstream.
PIPELINE_MAX_SEQUENCE_LENGTH = 512


@dataclass(slots=True)
class PromptCacheStats:
    hits: int = 0
    misses: int = 0  # prompts that went through the text encoder


class PromptTokenizer:
    """Counts a prompt's tokens as the text encoder will see them (for request validation)."""

    def __init__(self, pipeline: QwenImagePipeline) -> None:
        # A private copy: a fast tokenizer is not safe to share with the engine thread.
        self._tokenizer = copy.deepcopy(pipeline.tokenizer)
        self._template = pipeline.prompt_template_encode
        self._drop = pipeline.prompt_template_encode_start_idx

    def count(self, prompt: str) -> int:
        ids = self._tokenizer(self._template.format(prompt), add_special_tokens=True).input_ids
        return max(0, len(ids) - int(self._drop))


class PromptEncoder:
    """Turns prompts into text-encoder hidden states. Runs on the engine thread only.

    Prompts and negative prompts have limits of their own (`max_prompt_tokens`,
    `max_negative_prompt_tokens`); each text is cut at its own limit, as the pipeline cuts at
    `max_sequence_length` after encoding, so a negative is never shortened to the prompt's.
    """

    def __init__(
        self,
        pipeline: QwenImagePipeline,
        cache_size: int,
        max_tokens: int,
        max_negative_tokens: int | None = None,
    ) -> None:
        self._tokenizer = pipeline.tokenizer
        self._text_encoder = pipeline.text_encoder
        self._template = pipeline.prompt_template_encode
        self._drop = pipeline.prompt_template_encode_start_idx
        self._prompt_limit = min(max_tokens, PIPELINE_MAX_SEQUENCE_LENGTH)
        self._negative_limit = min(
            max_tokens if max_negative_tokens is None else max_negative_tokens,
            PIPELINE_MAX_SEQUENCE_LENGTH,
        )
        self._tokenizer_max_length = pipeline.tokenizer_max_length + self._drop
        # Keyed by (text, token limit): one text cut at two limits is two entries.
        self._cache: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self.stats = PromptCacheStats()

    @property
    def max_tokens(self) -> int:
        """The most text tokens any row's states can have, prompt or negative (what the
        transformer's text length, and so compiled shapes and memory, must allow for)."""
        return max(self._prompt_limit, self._negative_limit)

    @torch.no_grad()
    def encode(
        self,
        prompts: Sequence[str],
        negatives: Sequence[str],
        device: torch.device,
        dtype: torch.dtype,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Returns one [tokens, dim] tensor per prompt and per negative prompt, each cut at its
        own limit; uncached texts share one encoder call."""
        keys = [(text, self._prompt_limit) for text in prompts] + [
            (text, self._negative_limit) for text in negatives
        ]
        found = {key: self._lookup(key) for key in dict.fromkeys(keys)}
        missing = [key for key, embedding in found.items() if embedding is None]
        self.stats.hits += len(keys) - len(missing)
        self.stats.misses += len(missing)
        if missing:
            for key, embedding in zip(
                missing, self._run_encoder(missing, device, dtype), strict=True
            ):
                found[key] = embedding
                self._store(key, embedding)
        states: list[torch.Tensor] = [found[key] for key in keys]  # type: ignore[misc]
        return states[: len(prompts)], states[len(prompts) :]

    def _run_encoder(
        self, keys: list[tuple[str, int]], device: torch.device, dtype: torch.dtype
    ) -> list[torch.Tensor]:
        tokens = self._tokenizer(
            [self._template.format(text) for text, _limit in keys],
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
            hidden[row, self._drop : length][:limit].to(dtype=dtype, copy=True)
            for row, ((_text, limit), length) in enumerate(zip(keys, lengths, strict=True))
        ]

    def _lookup(self, key: tuple[str, int]) -> torch.Tensor | None:
        embedding = self._cache.get(key)
        if embedding is not None:
            self._cache.move_to_end(key)
        return embedding

    def _store(self, key: tuple[str, int], embedding: torch.Tensor) -> None:
        if self._cache_size <= 0:
            return
        self._cache[key] = embedding
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


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
