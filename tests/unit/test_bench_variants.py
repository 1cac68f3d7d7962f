"""The variants benchmark's pure parts (bench/variants.py): the servers it starts are ones the
server accepts, and its arithmetic; no server runs here."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root holds bench/

from imagegen_server.base.config import Settings, load_settings

from bench import variants as bench


@pytest.fixture
def args(tmp_path: Path) -> argparse.Namespace:
    (tmp_path / "adapters").mkdir()
    for name in ("ink", "neon"):
        (tmp_path / "adapters" / f"{name}.safetensors").write_bytes(b"")
    return argparse.Namespace(model=tmp_path, resolution=(256, 256))


def settings_of(command: list[str]) -> Settings:
    """What `imagegen-server serve` makes of a bench server's flags (no model is loaded)."""
    from imagegen_server.base.config import add_settings_arguments

    parser = argparse.ArgumentParser()
    source = add_settings_arguments(parser)
    return load_settings(source, parser.parse_args(command))


def test_the_servers_it_starts_are_valid_configurations(
    args: argparse.Namespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("IMAGEGEN_CONFIG", raising=False)
    shared = ["--model", str(args.model), "--default-steps", "4"]
    settings = settings_of(bench._own(shared + bench._flags(args, "variants")))
    assert [v.name for v in settings.variants] == [v.name for v in bench.VARIANTS]
    fused = settings_of(bench._own(shared + bench._flags(args, "fused-lightning-8")))
    assert fused.scheduler_preset == "lightning"
    assert fused.lora == [str(args.model / "adapters/neon.safetensors")]


def test_requests_name_variants_only_on_the_variants_server(args: argparse.Namespace) -> None:
    mixed = [bench._class_of(args, "variants", bench.MIXED, client) for client in range(3)]
    assert [cls.variant for cls in mixed] == ["lightning-4", "lightning-8", "base"]
    assert [cls.steps for cls in mixed] == [4, 8, 16] and mixed[2].guidance_scale == 4.0
    fused = bench._class_of(args, "fused-base", "base", 0)
    assert (fused.variant, fused.steps, fused.guidance_scale) == ("", 16, 4.0)


def test_one_variant_at_a_time_is_the_harmonic_mix() -> None:
    # Equal shares at 1, 2 and 4 images/s: (1 + 0.5 + 0.25) / 3 s per image.
    assert bench.one_variant_at_a_time([1.0, 2.0, 4.0]) == pytest.approx(3 / 1.75)
    assert math.isnan(bench.one_variant_at_a_time([1.0, 0.0, 4.0]))


def test_the_report_sets_the_mix_against_the_fused_servers() -> None:
    summaries = [
        {
            "system": system,
            "traffic": traffic,
            "throughput_ips": ips,
            "p95_s": {"base": 2.0},
            "rows_per_step": 3.0,
            "requests": 10,
        }
        for system, traffic, ips in [
            ("variants", bench.MIXED, 1.2),
            ("variants", bench.ALONE, 1.8),
            ("fused-lightning-4", "lightning-4", 4.0),
            ("fused-lightning-8", "lightning-8", 2.0),
            ("fused-base", "base", 1.0),
        ]
    ]
    machine = {"date": "today", "cpu_model": "cpu", "logical_cores": 2, "torch": "2.13"}
    settings = {"clients": 12, "resolution": "256x256", "rounds": 1, "window_s": 4.0}
    results = {"settings": settings, "machine": machine, "summaries": summaries}
    lines = bench.summary_lines({**results, "command": "x", "quick": True, "wall_s": 60})
    mixed = 1 / ((0.25 + 0.5 + 1.0) / 3)
    assert f"one variant at a time: {mixed:.3f} images/s (ratio {1.2 / mixed:.2f})" in lines[-1]
    assert "1.800 images/s against 2.000 fused (ratio 0.90)" in lines[-1]


def test_a_run_is_summarized_from_its_stored_records(args: argparse.Namespace) -> None:
    """The path of a real run: records of requests that name variants, through the JSON table,
    pooled per variant by their step counts."""
    from bench.stats import OK, RequestRecord, records_table

    records = []
    for index in range(6):
        cls = bench._class_of(args, "variants", bench.MIXED, index)
        latency = float(cls.steps)  # each variant's latency its step count, to tell them apart
        records.append(RequestRecord(index, cls.steps, cls.label, 0.0, finished_s=latency, code=OK))
    run = {"system": "variants", "traffic": bench.MIXED, "clients": 3, "rows_per_step": 2.0}
    stored = [{**run, "records": records_table(records)}]
    summary = bench._summarize(stored, "variants", bench.MIXED)
    assert summary["p95_s"] == {variant.name: variant.steps for variant in bench.VARIANTS}
    assert summary["requests"] == 6
