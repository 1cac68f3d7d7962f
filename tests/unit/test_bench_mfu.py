"""The MFU benchmark (bench/flops.py, bench/mfu.py): the FLOP count it divides by, and one small
real run through the engine on the tiny model, by `python -m bench mfu`'s entry point."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root holds bench/

from imagegen_server.engine.tiny_model import PRESETS, transformer_config

from bench.cli import main as bench_main
from bench.flops import transformer_step_flops

FULL = transformer_config(PRESETS["full"])
VAE_SCALE_FACTOR = 8  # Qwen-Image's VAE
TEXT_TOKENS = 128


def mfu_main(argv: list[str]) -> int:
    return bench_main(["mfu", *argv])


def qwen_image_step_flops(width: int, height: int, text_tokens: int) -> float:
    """The dual-stream block worked out by hand: per token and block, q/k/v/out projections
    (4 d^2) and the 4x MLP (8 d^2) of its own stream; attention over image and text tokens
    together (Q K^T and A V, 2 S^2 d each); patch embedding in and out, and the text input
    projection. A multiply-add is 2 FLOPs; modulation (once per row, not per token) is left
    out, so this is a lower bound within a fraction of a percent."""
    d = FULL["num_attention_heads"] * FULL["attention_head_dim"]
    image_tokens = (width // VAE_SCALE_FACTOR // 2) * (height // VAE_SCALE_FACTOR // 2)
    tokens = image_tokens + text_tokens
    blocks = FULL["num_layers"] * (2 * tokens * 12 * d * d + 4 * tokens * tokens * d)
    patches = 2 * 2 * image_tokens * FULL["in_channels"] * d
    text_in = 2 * text_tokens * FULL["joint_attention_dim"] * d
    return float(blocks + patches + text_in)


@pytest.mark.parametrize("width,height", [(1024, 1024), (1328, 1328)])
def test_the_counted_flops_of_the_full_size_transformer_match_its_arithmetic(
    width: int, height: int
) -> None:
    counted = transformer_step_flops(FULL, width, height, TEXT_TOKENS, VAE_SCALE_FACTOR)
    by_hand = qwen_image_step_flops(width, height, TEXT_TOKENS)
    assert by_hand <= counted <= 1.005 * by_hand
    assert 60e12 < counted < 200e12  # tens of TFLOP per image and step, as a 20 B DiT costs


def test_flops_grow_exactly_with_the_rows_of_a_call() -> None:
    one = transformer_step_flops(FULL, 1024, 1024, TEXT_TOKENS, VAE_SCALE_FACTOR, rows=1)
    three = transformer_step_flops(FULL, 1024, 1024, TEXT_TOKENS, VAE_SCALE_FACTOR, rows=3)
    assert three == 3 * one


def test_a_small_run_reports_rate_and_mfu_for_every_batch_size(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    markdown = tmp_path / "benchmarks.md"
    argv = [
        "--device=cpu",
        f"--model={tiny_model}",
        "--resolutions=64x64",
        "--batch-sizes=1,2",
        "--steps=2",
        "--settings=eager",
        "--min-batches=1",
        "--torch-threads=0",
        f"--out={tmp_path}",
        f"--markdown={markdown}",
    ]
    assert mfu_main(argv) == 0
    results = json.loads((tmp_path / "mfu-cpu.json").read_text())
    assert results["peak"]["tflops"] > 0 and results["peak"]["dtype"] == "float32"
    (flops,) = results["flops"]
    assert flops["resolution"] == "64x64" and flops["flop_per_image_step"] > 0
    points = results["points"]
    assert [(p["setting"], p["batch_size"]) for p in points] == [("eager", 1), ("eager", 2)]
    for point in points:
        achieved = point["batch_size"] * flops["flop_per_image_step"] / point["ms_per_step"] / 1e9
        assert point["tflops"] == pytest.approx(achieved)
        assert point["mfu"] == pytest.approx(point["tflops"] / results["peak"]["tflops"])
        assert point["images_per_s"] > 0
    (target,) = results["targets"]
    assert target["best_mfu"] == max(p["mfu"] for p in points)
    report = markdown.read_text()
    assert "<!-- bench-mfu:cpu:begin" in report and "<!-- bench-mfu:cpu:end -->" in report
    assert report.count("| eager | 64x64 |") == 2
    attention = results["attention"]
    assert attention["rows"] == 4 and attention["layers"] == 2  # the tiny transformer's blocks
    assert {(p["backend"], p["padded"]) for p in attention["points"] if "ms" in p} >= {
        ("native", False),
        ("native", True),
    }
    assert "| 64x64 | native (" in report and "padding adds" in report
    # The report is a function of the JSON alone.
    markdown.unlink()
    assert (
        mfu_main(["--report-only", str(tmp_path / "mfu-cpu.json"), f"--markdown={markdown}"]) == 0
    )
    assert markdown.read_text() == report

    # A second run (say, another compile setting inside another time limit) merges into one.
    second = tmp_path / "second"
    second_argv = [arg for arg in argv if not arg.startswith(("--batch-sizes", "--out", "--mark"))]
    second_argv += ["--batch-sizes=3", f"--out={second}", f"--markdown={second / 'unused.md'}"]
    assert mfu_main([*second_argv, "--no-attention"]) == 0
    assert "attention" not in json.loads((second / "mfu-cpu.json").read_text())
    runs = [str(second / "mfu-cpu.json"), str(tmp_path / "mfu-cpu.json")]
    assert mfu_main(["--report-only", *runs, f"--markdown={markdown}"]) == 0
    merged = markdown.read_text()
    assert merged.count("| eager | 64x64 |") == 3 and "The 2 runs merged here" in merged
    assert merged.count("| 64x64 | native (") == 1  # from the run that measured it
