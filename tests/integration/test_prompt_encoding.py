"""Prompt states as the engine keeps them: the pipeline's own states without the LM head, cut
where the pipeline cuts them, each cached entry holding only its own memory, and rows costed
with the longest text they can carry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from imagegen_server.engine.prompts import PromptEncoder, PromptTokenizer

CPU = torch.device("cpu")


def test_states_equal_the_pipelines_and_no_logits_are_computed(reference_pipeline: Any) -> None:
    head_calls: list[object] = []
    hook = reference_pipeline.text_encoder.lm_head.register_forward_hook(
        lambda *args: head_calls.append(args)
    )
    try:
        prompts = ["a fox", "a lighthouse on a cliff at dusk"]
        states = PromptEncoder(reference_pipeline, 0, 512).encode(prompts, CPU, torch.float32)
    finally:
        hook.remove()
    assert head_calls == []  # the vocabulary's logits: wasted work and memory
    expected, mask = reference_pipeline.encode_prompt(prompts, device=CPU)
    for row, state in enumerate(states):
        length = int(mask[row].sum())
        assert state.shape[0] == length
        assert torch.equal(state, expected[row, :length])


def test_a_cached_prompt_holds_only_its_own_states(reference_pipeline: Any) -> None:
    # One encoder call pads every prompt to the longest; a cached slice of that batch would
    # keep the whole padded batch alive for as long as it stays in the cache.
    encoder = PromptEncoder(reference_pipeline, cache_size=8, max_tokens=512)
    prompts = ["x", "a fox", "a lighthouse on a cliff at dusk, " * 4]
    states = encoder.encode(prompts, CPU, torch.float32)
    cached = encoder.encode(prompts, CPU, torch.float32)
    assert encoder.stats.hits == len(prompts)
    for state, again in zip(states, cached, strict=True):
        assert again is state
        assert state.untyped_storage().nbytes() == state.numel() * state.element_size()


def test_a_text_past_the_limit_is_cut_as_the_pipeline_cuts_it(reference_pipeline: Any) -> None:
    text = "blurry, low quality, watermark, text, jpeg artifacts"
    limit = PromptTokenizer(reference_pipeline).count(text) - 10
    (state,) = PromptEncoder(reference_pipeline, 0, limit).encode([text], CPU, torch.float32)
    expected, _mask = reference_pipeline.encode_prompt(text, device=CPU, max_sequence_length=limit)
    assert torch.equal(state, expected[0])
    # Never past the pipeline's own default, whatever the settings allow.
    assert PromptEncoder(reference_pipeline, 0, 1024).max_tokens == 512


def test_a_row_is_costed_with_the_longest_text_it_can_carry(tiny_model: Path) -> None:
    from imagegen_server.engine.engine import Engine
    from imagegen_server.engine.model import load_model

    model = load_model(str(tiny_model))
    image_tokens = (64 // (2 * model.vae_scale_factor)) ** 2  # 2x2 patches of latents
    for prompt_limit, negative_limit in ((100, 300), (300, 100)):
        engine = Engine(
            model,
            prompt_cache_size=1,
            max_prompt_tokens=prompt_limit,
            max_negative_prompt_tokens=negative_limit,
        )
        assert engine.tokens_per_row(64, 64) == image_tokens + 300
