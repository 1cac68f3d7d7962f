"""The riskiest batches, row by row: true CFG with each row's own guidance and negative prompt,
rows of other step counts joining mid-run, a burst of mixed requests under the server's default
row selection, and prompts in Chinese. Every row equals its image alone, and where one request
suffices to say so, `QwenImagePipeline`'s."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from imagegen_client import OutputFormat, Step
from support import ALL_ROWS, StreamWatcher, assert_same_image, pipeline_image, pixels

NPY = OutputFormat.NPY
# A negative prompt longer than the prompt's token limit in the CFG test (the limits are set
# from the counts: the prompt's just above the longest prompt, the negative's above this).
LONG_NEGATIVE = "blurry, low quality, watermark, jpeg artifacts, " * 3


@dataclass(frozen=True)
class Ask:
    """One request of a test batch: what the client sends."""

    prompt: str  # the prompt
    seed: int  # the request's seed
    steps: int = 4  # denoising steps
    guidance: float = 1.0  # true-CFG scale (1.0 = off)
    negative: str = ""  # negative prompt (used when guidance > 1)
    size: tuple[int, int] = (64, 64)  # (width, height)
    extra: dict[str, Any] = field(default_factory=dict)  # any other request option

    def options(self) -> dict[str, Any]:
        width, height = self.size
        return {
            "seed": self.seed,
            "steps": self.steps,
            "guidance_scale": self.guidance,
            "negative_prompt": self.negative,
            "width": width,
            "height": height,
            "output_format": NPY,
            **self.extra,
        }


def watch(client: Any, asks: list[Ask]) -> list[StreamWatcher]:
    watchers = [StreamWatcher(client, ask.prompt, **ask.options()) for ask in asks]
    for watcher in watchers:
        watcher.queued()
    return watchers


def last_step(watcher: StreamWatcher) -> int:
    return max((event.step for event in watcher.seen if isinstance(event, Step)), default=0)


def test_cfg_rows_with_their_own_scales_and_negatives_share_steps_and_equal_diffusers(
    server_factory: Any, reference_pipeline: Any
) -> None:
    """A row that took its neighbour's guidance scale or negative prompt would differ from
    its solo image and from the pipeline's: the scales 2.5..7 and negatives (empty, short, long
    past the prompt's token limit) are all different, and two rows of other step counts join
    after two steps."""
    from imagegen_server.engine.prompts import PromptTokenizer

    first = [
        Ask("a lighthouse at dusk", 1, steps=6, guidance=4.0, negative=""),
        Ask("a fox", 2, steps=6, guidance=2.5, negative="dark"),
        Ask("an old harbour town", 3, steps=6, guidance=7.0, negative=LONG_NEGATIVE),
    ]
    joiners = [
        Ask("a red boat", 4, steps=4, guidance=3.0, negative="fog, rain"),
        Ask("山水画", 5, steps=2, guidance=5.5, negative="text"),
    ]
    count = PromptTokenizer(reference_pipeline).count
    prompt_limit = max(count(ask.prompt) for ask in first + joiners) + 2
    assert count(LONG_NEGATIVE) > prompt_limit + 50
    server = server_factory(
        step_budget=0,
        max_prompt_tokens=prompt_limit,
        max_negative_prompt_tokens=count(LONG_NEGATIVE) + 8,
        **ALL_ROWS,
    )
    client = server.client()
    running = watch(client, first)
    server.batcher.set_step_budget(2)
    running[0].step(2)
    late = watch(client, joiners)
    server.batcher.set_step_budget(None)
    results = [watcher.completed().result for watcher in running + late]
    assert [result.batch_size for result in results] == [5, 5, 5, 5, 5]  # all five shared steps
    assert [last_step(watcher) for watcher in late] == [4, 2]
    for ask, result in zip(first + joiners, results, strict=True):
        alone = client.generate(ask.prompt, **ask.options())
        assert alone.batch_size == 1
        assert_same_image(pixels(result), pixels(alone))
        expected = pipeline_image(
            reference_pipeline,
            ask.prompt,
            ask.seed,
            steps=ask.steps,
            negative_prompt=ask.negative,
            guidance=ask.guidance,
        )
        assert_same_image(pixels(result), expected)


def test_a_burst_of_eight_mixed_requests_under_the_default_selection_equals_solo_images(
    server_factory: Any,
) -> None:
    """The server's defaults (`row_selection=cost`): eight requests of two sizes, 2 to 6 steps,
    with and without CFG, one in Chinese and one of two images, all queued at once. Every image
    of every request equals its image alone."""
    server = server_factory(step_budget=0)
    client = server.client()
    asks = [
        Ask("a fox", 10),
        Ask("a boat", 11, steps=2),
        Ask("a castle", 12, steps=6, guidance=3.0, negative="blurry"),
        Ask("a river", 13, size=(96, 48)),
        Ask("一只猫在雪地里", 14, steps=3),
        Ask("a hill", 15, steps=5, guidance=4.5, negative=""),
        Ask("a field", 16, size=(96, 48), steps=2, extra={"num_images": 2}),
        Ask("a lake at dawn", 17, guidance=2.0, negative="dark, night"),
    ]
    watchers = watch(client, asks)
    server.batcher.set_step_budget(None)
    results = [watcher.completed().result for watcher in watchers]
    for ask, result in zip(asks, results, strict=True):
        alone = client.generate(ask.prompt, **ask.options())
        assert len(result.images) == len(alone.images)
        for index in range(len(alone.images)):
            assert_same_image(pixels(result, index), pixels(alone, index))


# The tiny model's tokenizer is byte-level (no trained merges: every UTF-8 byte is a token), so
# a CJK prompt reaches the text encoder as 3 tokens a character where Qwen2's real tokenizer
# would make about one; what these prove is that such text takes the same path through the
# server as through the pipeline, bytes, special tokens, template and all.
BILINGUAL = ["一座灯塔在黄昏的悬崖上", "a lighthouse 在黄昏 on a cliff, 水墨画 style"]


def test_chinese_and_mixed_prompts_equal_the_diffusers_pipeline(
    server: Any, reference_pipeline: Any
) -> None:
    client = server.client()
    for seed, prompt in enumerate(BILINGUAL):
        for guidance, negative in ((1.0, ""), (4.0, "模糊, low quality")):
            result = client.generate(
                prompt,
                seed=seed,
                guidance_scale=guidance,
                negative_prompt=negative,
                width=64,
                height=48,
                output_format=NPY,
            )
            expected = pipeline_image(
                reference_pipeline,
                prompt,
                seed,
                width=64,
                height=48,
                negative_prompt=negative if guidance > 1 else None,
                guidance=guidance,
            )
            assert_same_image(pixels(result), expected)
