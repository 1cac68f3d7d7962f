"""The cross-field checks of the settings, run once at start-up (`Settings` calls
`settings_problems`); each problem names the settings involved, so a user can act on it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .variants import variant_problems

if TYPE_CHECKING:
    from .config import Settings


def settings_problems(settings: Settings) -> list[str]:
    """Every inconsistency between settings; empty when they agree."""
    return (
        _size_problems(settings)
        + _range_problems(settings)
        + _tls_problems(settings)
        + _variant_problems(settings)
    )


def _size_problems(settings: Settings) -> list[str]:
    problems = []
    for axis in ("width", "height"):
        low, high = getattr(settings, f"min_{axis}"), getattr(settings, f"max_{axis}")
        default = getattr(settings, f"default_{axis}")
        if low > high:
            problems.append(f"min_{axis} ({low}) > max_{axis} ({high})")
        if not low <= default <= high:
            problems.append(f"default_{axis} ({default}) outside [{low}, {high}]")
    if settings.default_width * settings.default_height > settings.max_pixels:
        problems.append("default_width x default_height exceeds max_pixels")
    return problems


def _range_problems(settings: Settings) -> list[str]:
    problems = []
    if not settings.variants and settings.resolved_default_steps > settings.max_steps:
        problems.append(f"default steps ({settings.resolved_default_steps}) > max_steps")
    if settings.max_num_images > settings.max_batch_size:
        problems.append(
            f"max_num_images ({settings.max_num_images}) > max_batch_size"
            f" ({settings.max_batch_size}): a request's images must fit one batch"
        )
    if not 1 <= settings.default_priority <= settings.priority_levels:
        problems.append(f"default_priority outside [1, priority_levels={settings.priority_levels}]")
    if settings.min_guidance_scale > settings.max_guidance_scale:
        problems.append("min_guidance_scale > max_guidance_scale")
    if settings.max_seed - settings.min_seed + 1 < settings.max_num_images:  # image i uses seed + i
        problems.append(
            f"[min_seed, max_seed] must hold max_num_images ({settings.max_num_images}) seeds"
        )
    if any(size < 1 or size > settings.max_batch_size for size in settings.preferred_batch_sizes):
        problems.append(f"preferred_batch_sizes must lie in [1, {settings.max_batch_size}]")
    if settings.compile == "dynamic" and settings.compile_scope == "model":
        # The whole transformer takes the rows (img_shapes, a list) and the text length as
        # Python values, so Dynamo specialises on them: a graph per new value while serving.
        problems.append(
            "compile=dynamic needs compile_scope=blocks: with scope model every new batch "
            "size and prompt length compiles while serving"
        )
    if (
        settings.compile == "buckets"
        and max(settings.compile_buckets, default=0) < settings.max_batch_size
    ):
        problems.append(
            f"compile_buckets must reach max_batch_size ({settings.max_batch_size});"
            " a CFG image is two rows, so CFG batches hold half the largest bucket in images"
        )
    return problems


def _tls_problems(settings: Settings) -> list[str]:
    problems = []
    if (settings.tls_cert_file is None) != (settings.tls_key_file is None):
        problems.append("tls_cert_file and tls_key_file go together")
    if settings.tls_client_ca_file is not None and settings.tls_cert_file is None:
        problems.append("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
    return problems


def _variant_problems(settings: Settings) -> list[str]:
    if not settings.variants:
        return []
    problems = variant_problems(
        settings.variants,
        settings.max_steps,
        (settings.min_guidance_scale, settings.max_guidance_scale),
        settings.adapter_dir,
    )
    # Each of these would apply to every variant's rows at once: a variant says it itsettings.
    if settings.lora:
        problems.append("lora applies to every row: with variants, give each variant loras")
    if settings.scheduler_preset != "default":
        problems.append("scheduler_preset: with variants, each variant sets its own")
    if settings.default_steps is not None:
        problems.append("default_steps: with variants, each variant sets its own")
    return problems
