"""Settings precedence (CLI > environment > YAML > defaults) and start-up validation."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from imagegen_server.base.config import add_settings_arguments, load_settings
from pydantic import ValidationError


def parse(argv: list[str]) -> tuple[argparse.Namespace, object]:
    parser = argparse.ArgumentParser()
    source = add_settings_arguments(parser)
    return parser.parse_args(argv), source


def test_cli_beats_environment_beats_yaml_beats_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "imagegen.yaml"
    config.write_text("model: from-yaml\nport: 7001\nmax_batch_size: 6\nmax_queue_delay_ms: 9\n")
    monkeypatch.setenv("IMAGEGEN_CONFIG", str(config))
    monkeypatch.setenv("IMAGEGEN_PORT", "7002")
    monkeypatch.setenv("IMAGEGEN_MAX_BATCH_SIZE", "7")
    args, source = parse(["--max-batch-size", "5", "--batching", "request"])
    settings = load_settings(source, args)  # type: ignore[arg-type]
    assert settings.model == "from-yaml"  # only the YAML sets it
    assert settings.max_queue_delay_ms == 9  # YAML beats the default
    assert settings.port == 7002  # the environment beats YAML
    assert settings.max_batch_size == 5  # the flag beats the environment
    assert settings.batching == "request"
    assert settings.metrics_port == 9090  # default


def test_flags_are_kebab_case_with_units(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGEGEN_CONFIG", raising=False)
    args, source = parse(
        [
            "--model",
            "m",
            "--drain-timeout-s",
            "12.5",
            "--preferred-batch-sizes",
            "[2,4]",
            "--no-warmup",
        ]
    )
    settings = load_settings(source, args)  # type: ignore[arg-type]
    assert (settings.drain_timeout_s, settings.preferred_batch_sizes, settings.warmup) == (
        12.5,
        [2, 4],
        False,
    )


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"min_width": 512, "max_width": 256}, "min_width (512) > max_width (256)"),
        ({"default_width": 4096}, "default_width (4096) outside [256, 2048]"),
        ({"max_num_images": 9, "max_batch_size": 8}, "a request's images must fit one batch"),
        ({"default_priority": 5}, "default_priority outside [1, priority_levels=3]"),
        ({"preferred_batch_sizes": [16]}, "preferred_batch_sizes must lie in [1, 8]"),
        ({"batching": "dynamic"}, "batching"),
        ({"row_selection": "fastest"}, "row_selection"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"min_seed": 7, "max_seed": 7}, "[min_seed, max_seed] must hold max_num_images (4) seeds"),
        ({"max_request_bytes": 2**32}, "max_request_bytes"),  # a gRPC length is 32-bit
        ({"default_strength": 0.0}, "default_strength"),
    ],
)
def test_inconsistent_settings_are_refused_with_an_actionable_message(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=__import__("re").escape(message)):
        load_settings(model="m", **overrides)


def test_a_missing_config_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_settings(model="m", config=tmp_path / "absent.yaml")


def test_a_config_file_that_is_not_yaml_is_reported_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from imagegen_server.main import main

    config = tmp_path / "imagegen.yaml"
    config.write_text("port: [unclosed\n")
    assert main(["serve", "--model", "m", "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("imagegen-server: invalid settings:") and "line 1" in error


def test_the_largest_response_stays_within_one_grpc_message() -> None:
    from imagegen_server.api.transport import max_response_bytes

    assert max_response_bytes(load_settings(model="m")) < 2**31  # the defaults: 4 x 2048^2
    huge = load_settings(model="m", max_num_images=8, max_batch_size=8, max_pixels=16384**2)
    assert max_response_bytes(huge) == 2**31 - 1


def test_default_steps_follow_the_scheduler_preset() -> None:
    assert load_settings(model="m").resolved_default_steps == 30
    assert load_settings(model="m", scheduler_preset="lightning").resolved_default_steps == 8
    assert (
        load_settings(
            model="m", scheduler_preset="lightning", default_steps=4
        ).resolved_default_steps
        == 4
    )


def lora_file(tmp_path: Path, name: str = "style.safetensors") -> Path:
    """A file where a variant's LoRA is named (settings check only that it exists)."""
    path = tmp_path / name
    path.write_bytes(b"")
    return path


def test_variants_take_a_yaml_list_from_flags_environment_and_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lora = lora_file(tmp_path)
    monkeypatch.delenv("IMAGEGEN_CONFIG", raising=False)
    flow = f"[{{name: fast, loras: ['{lora}@0.8'], scheduler_preset: lightning, default_steps: 4}}]"
    args, source = parse(["--model", "m", "--variants", flow])
    [fast] = load_settings(source, args).variants  # type: ignore[arg-type]
    assert (fast.name, fast.loras[0].file, fast.loras[0].scale) == ("fast", str(lora), 0.8)
    assert fast.scheduler_preset == "lightning" and fast.default_steps == 4
    monkeypatch.setenv("IMAGEGEN_VARIANTS", "- name: base\n- name: fast\n  default: true\n")
    settings = load_settings(model="m")
    assert [variant.name for variant in settings.variants] == ["base", "fast"]
    assert settings.resolved_default_steps == 30  # fast's: the default preset's 30
    monkeypatch.delenv("IMAGEGEN_VARIANTS")
    config = tmp_path / "imagegen.yaml"
    config.write_text(
        "model: m\nvariants:\n  - name: four\n    loras:\n"
        f"      - file: {lora}\n        scale: 1.0\n    scheduler_preset: lightning\n"
        "    default_steps: 4\n    min_steps: 4\n    max_steps: 4\n"
    )
    [four] = load_settings(config=str(config)).variants
    assert (four.min_steps, four.max_steps) == (4, 4)


@pytest.mark.parametrize(
    "variants,message",
    [
        ("- name: a\n- name: a\n", "variants[1] ('a'): name is used by an earlier entry"),
        ("- name: 'a b'\n", "variants[0] ('a b'): name must be 1-64 of [A-Za-z0-9._-]"),
        (
            "- name: a\n- name: b\n  default_steps: 12\n  max_steps: 8\n",
            "variants[1] ('b'): default_steps 12 outside [min_steps 1, max_steps 8]",
        ),
        ("- name: a\n  max_steps: 99\n", "variants[0] ('a'): max_steps 99 exceeds the setting"),
        (
            "- name: a\n  default_steps: 8\n  min_steps: 9\n  max_steps: 8\n",
            "variants[0] ('a'): min_steps 9 > max_steps 8",
        ),
        (
            "- name: a\n  default_guidance_scale: 50\n",
            "variants[0] ('a'): default_guidance_scale 50.0 outside [min_guidance_scale 1.0",
        ),
        (
            "- name: a\n  loras: [/no/such/file.safetensors]\n",
            "variants[0] ('a'): loras[0]: file not found: /no/such/file.safetensors",
        ),
        (
            "- name: a\n  loras: [lightning]\n",
            "variants[0] ('a'): loras[0]: 'lightning' is an adapter name, and adapter_dir is not",
        ),
        ("- name: a\n  default: true\n- name: b\n  default: true\n", "only one entry may set"),
        ("- name: a\n  scheduler: lightning\n", "variants.0.scheduler"),  # unknown field
        ("- name: a\n  scheduler_preset: turbo\n", "variants.0.scheduler_preset"),
        ("- name: a\n  loras: ['x@half']\n", "variants.0.loras.0.scale"),
        ("{name: a}", "variants"),  # a mapping, not a list
        ("- name: [unclosed\n", "not a YAML list"),
    ],
)
def test_malformed_variants_are_refused_naming_the_entry_and_field(
    variants: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("IMAGEGEN_CONFIG", raising=False)
    with pytest.raises(ValidationError, match=__import__("re").escape(message)):
        load_settings(model="m", variants=variants)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"scheduler_preset": "lightning"}, "scheduler_preset: with variants, each variant"),
        ({"default_steps": 4}, "default_steps: with variants, each variant sets its own"),
        ({"lora": ["x.safetensors"]}, "lora applies to every row"),
    ],
)
def test_settings_that_would_apply_to_every_variant_are_refused_with_variants(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=__import__("re").escape(message)):
        load_settings(model="m", variants="- name: a\n", **overrides)


def test_malformed_variants_stop_start_up_before_the_model_loads(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from imagegen_server.main import main

    flag = "[{name: base}, {name: fast, default_steps: 99}]"
    assert main(["serve", "--model", "m", "--variants", flag]) == 2
    error = capsys.readouterr().err
    assert error.startswith("imagegen-server: invalid settings:")
    assert "variants[1] ('fast'): default_steps 99 outside" in error


def test_the_readme_variants_example_is_a_valid_configuration(tmp_path: Path) -> None:
    """The README's Lightning 4-step / 8-step / base example, with its LoRA files stood in for
    by empty files at the same names."""
    import re

    import yaml

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = re.search(r"```yaml\n(# imagegen\.yaml.*?)```", readme, re.S)
    assert block is not None
    example = block.group(1).replace("/models/loras", str(tmp_path))
    for name in re.findall(r"Qwen-Image-Lightning-\w+-V[\d.]+\.safetensors", example):
        lora_file(tmp_path, name)
    config = tmp_path / "imagegen.yaml"
    config.write_text(example)
    settings = load_settings(config=str(config))
    assert [variant.name for variant in settings.variants] == ["lightning-4", "lightning-8", "base"]
    assert settings.resolved_default_steps == 4
    assert yaml.safe_load(example)["variants"][2]["default_guidance_scale"] == 4.0
