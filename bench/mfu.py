"""`make bench-mfu`: the engine against the hardware limit, by batch size and compile setting.

    python -m bench mfu                  # CUDA: the full-size stand-in, 1024x1024 and 1328x1328
    python -m bench mfu --quick          # a smoke check of every part
    python -m bench mfu --settings eager,buckets --batch-sizes 1,4,8 --resolutions 1024x1024

First the card's peak: the best rate of large square matmuls in the engine's dtype. Then the
FLOPs of one transformer call per image at each resolution, counted by PyTorch, and the
attention kernels: one joint attention call with and without a text-padding mask, by backend
(bench/attention.py). Then, for each compile setting, the engine alone (no server) runs
batches of 1..8 requests at each resolution to the end and reports images/s (text encoding to
decoded images), ms per denoising step of the whole batch, the transformer TFLOP/s those steps
achieve, and MFU: that rate over the peak. Compile settings also report their start-up cost:
seconds to compile for every resolution from empty caches ("cold"), and again after an
in-process reset with inductor's on-disk cache kept ("warm": a restart with
TORCHINDUCTOR_CACHE_DIR on a persistent volume).

On CUDA the model is `tiny-model --preset full` (Qwen-Image's real sizes, random bf16 weights
drawn on the GPU); on CPU the `bench` preset. The JSON is written after every point, so a run
stopped part way keeps what it measured.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import attention
from .cli import add_engine_arguments, add_quick_argument, ints, resolutions, subset_of
from .flops import measure_matmul_peak, transformer_step_flops
from .limit import BatchTooLarge, EngineBench, measure_quietly
from .machine import describe_machine
from .output import (
    add_output_arguments,
    read_json,
    resolve_outputs,
    results_header,
    write_block,
    write_json,
)
from .servers import DEFAULT_MODEL, ensure_model
from .workloads import RequestClass

MFU_TARGET = 0.6  # of the measured peak, in the denoising loop


@dataclass(frozen=True, slots=True)
class CompileSetting:
    """A server compile configuration: `--compile MODE --compile-scope SCOPE`."""

    name: str
    mode: str  # off | buckets | dynamic
    scope: str  # blocks | model


# In the order they run: compiling blocks changes the transformer in place, so the eager and
# whole-model settings go first.
SETTINGS = {
    setting.name: setting
    for setting in (
        CompileSetting("eager", "off", "blocks"),
        CompileSetting("buckets-model", "buckets", "model"),
        CompileSetting("dynamic-model", "dynamic", "model"),
        CompileSetting("buckets", "buckets", "blocks"),
        CompileSetting("dynamic", "dynamic", "blocks"),
    )
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_quick_argument(parser, "fewer, shorter points")
    add_engine_arguments(
        parser,
        None,
        "model directory (default: .cache/full-model on CUDA, written with --preset full; "
        ".cache/bench-model on CPU)",
        threads_default=None,
    )
    parser.add_argument("--attention-backend", help="diffusers attention backend; unset = SDPA")
    parser.add_argument(
        "--resolutions",
        type=resolutions,
        help="WIDTHxHEIGHT list (CUDA: 1024x1024,1328x1328; CPU: 256x256)",
    )
    parser.add_argument("--steps", type=int, help="steps per request (default 8; quick 4)")
    parser.add_argument(
        "--batch-sizes", type=ints, help="engine batch sizes (default 1..8; quick 1,2)"
    )
    parser.add_argument(
        "--settings",
        type=subset_of(list(SETTINGS)),
        help=f"compile settings, from {','.join(SETTINGS)} (default eager,buckets,dynamic; "
        "quick eager,dynamic)",
    )
    parser.add_argument(
        "--compile-buckets", type=ints, default="1,2,4,8", help="buckets' batch sizes"
    )
    parser.add_argument("--min-batches", type=int, help="measured batches per point (default 2)")
    parser.add_argument(
        "--peak-sizes",
        type=ints,
        help="n of the n x n matmuls the peak is the best of (default CUDA 4096,8192,16384; "
        "CPU 512,1024,2048)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="measure a point again up to this often while other processes load the CPU",
    )
    parser.add_argument(
        "--no-attention",
        action="store_true",
        help="skip the attention kernels (no mask against a text-padding mask, by backend); "
        "a run split into several needs them once",
    )
    add_output_arguments(
        parser,
        "only redo the markdown from JSON files; several (say, one run per compile setting, "
        "each inside a time limit) are merged into one report",
        several=True,
    )


def run(args: argparse.Namespace) -> int:
    _fill_defaults(args)
    if args.report_only:
        update_markdown(merge_runs([read_json(path) for path in args.report_only]), args.markdown)
        return 0
    # Cold compile times need an empty inductor cache; a caller's own directory is respected.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench-mfu-"))
    results = run_bench(args)
    update_markdown(results, args.markdown)
    for target in results["targets"]:
        print(target["line"])
    print(f"results: {results_path(args.out, results)} and {args.markdown}")
    return 0


def _fill_defaults(args: argparse.Namespace) -> None:
    """The defaults that depend on --quick."""
    names = args.settings or (
        ["eager", "dynamic"] if args.quick else ["eager", "buckets", "dynamic"]
    )
    args.settings = [SETTINGS[name] for name in names]
    args.batch_sizes = args.batch_sizes or ([1, 2] if args.quick else [1, 2, 3, 4, 5, 6, 7, 8])
    args.steps = args.steps or (4 if args.quick else 8)
    args.min_batches = args.min_batches or (1 if args.quick else 2)
    resolve_outputs(args)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from imagegen_server.engine.model import resolve_device, resolve_dtype

    started = time.monotonic()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    on_cuda = device.type == "cuda"
    threads = args.torch_threads if args.torch_threads is not None else (0 if on_cuda else 2)
    if threads:
        torch.set_num_threads(threads)
    model_dir = args.model or (Path(".cache/full-model") if on_cuda else DEFAULT_MODEL)
    ensure_model(model_dir, preset="full" if on_cuda else "bench")
    resolutions = args.resolutions or ([(1024, 1024), (1328, 1328)] if on_cuda else [(256, 256)])

    # The peak first, while the device holds nothing else.
    peak = measure_matmul_peak(device, dtype, args.peak_sizes or None)
    if on_cuda:
        torch.cuda.empty_cache()  # the matmuls' operands go back before the model comes
    print(f"matmul peak: {peak.tflops:.3g} TFLOP/s ({peak.size}^3, {peak.dtype})", flush=True)
    bench = EngineBench(
        model_dir, str(device), args.dtype, threads, args.attention_backend, resolutions
    )
    model = bench.model
    flops = _count_flops(bench, resolutions)
    results: dict[str, Any] = {
        **results_header(args, describe_machine(threads, str(model.device))),
        "model": {
            "directory": str(model_dir),
            "dtype": str(model.dtype).removeprefix("torch."),
            "transformer_parameters": sum(
                p.numel() for p in model.pipeline.transformer.parameters()
            ),
        },
        "settings": {
            "steps": args.steps,
            "batch_sizes": args.batch_sizes,
            "compile_buckets": args.compile_buckets,
            "min_batches": args.min_batches,
            "attention_backend": args.attention_backend,
            "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
        },
        "peak": asdict(peak),
        "flops": flops,
        "compile": [],
        "points": [],
    }
    path = results_path(args.out, results)
    if not args.no_attention:
        results["attention"] = _measure_attention(bench, results["flops"], args.quick)
        write_json(results, path)
    for setting in args.settings:
        _measure_setting(bench, setting, resolutions, args, results)
        write_json(results, path)
    results["targets"] = evaluate(results)
    results["wall_s"] = round(time.monotonic() - started, 1)
    write_json(results, path)
    return results


def _count_flops(bench: EngineBench, resolutions: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Transformer FLOPs per image and step at each resolution, for the bench's prompts."""
    from imagegen_server.engine.sampling import LatentShape

    model = bench.model
    config = model.pipeline.transformer.config
    # The prompts of the measured batches differ only in their number (a few hundred at most).
    text_tokens = bench.prompt_tokens(100)
    flops = []
    for width, height in resolutions:
        count = transformer_step_flops(config, width, height, text_tokens, model.vae_scale_factor)
        shape = LatentShape.for_image(
            height, width, int(config["in_channels"]) // 4, model.vae_scale_factor
        )
        resolution = f"{width}x{height}"
        flops.append(
            {
                "resolution": resolution,
                "image_tokens": shape.seq_len,
                "text_tokens": text_tokens,
                "flop_per_image_step": count,
            }
        )
        print(
            f"transformer: {count / 1e12:.4g} TFLOP per image-step at {resolution} "
            f"({text_tokens} text tokens)",
            flush=True,
        )
    return flops


def _measure_attention(
    bench: EngineBench, flops: list[dict[str, Any]], quick: bool
) -> dict[str, Any]:
    """Joint attention calls at each resolution, with and without a text-padding mask."""
    model = bench.model
    config = model.pipeline.transformer.config
    calls = [
        attention.JointAttention(
            entry["resolution"],
            entry["image_tokens"],
            entry["text_tokens"],
            int(config["num_attention_heads"]),
            int(config["attention_head_dim"]),
        )
        for entry in flops
    ]
    # The math kernel holds every score at once: next to the full-size model that is memory
    # a GPU does not have, and no GPU server uses it.
    backends = [
        name for name in attention.BACKENDS if model.device.type != "cuda" or name != "_native_math"
    ]
    points = attention.measure_attention(
        calls, model.device, model.dtype, backends, rounds=1 if quick else attention.ROUNDS
    )
    for point in points:
        timing = f"{point['ms']:.3g} ms" if "ms" in point else f"cannot run: {point['error']}"
        mask = "padded" if point["padded"] else "no mask"
        print(f"attention {point['resolution']} {mask} {point['backend']}: {timing}", flush=True)
    return {"rows": attention.ROWS, "layers": int(config["num_layers"]), "points": points}


def _measure_setting(
    bench: EngineBench,
    setting: CompileSetting,
    resolutions: list[tuple[int, int]],
    args: argparse.Namespace,
    results: dict[str, Any],
) -> None:
    print(f"{setting.name} (--compile {setting.mode} --compile-scope {setting.scope}):", flush=True)
    cold = bench.compile(setting.mode, args.compile_buckets, setting.scope, resolutions)
    if setting.mode != "off":
        warm = bench.compile(setting.mode, args.compile_buckets, setting.scope, resolutions)
        results["compile"].append(
            {"setting": setting.name, "cold_s": round(cold, 2), "warm_s": round(warm, 2)}
        )
        print(f"  start-up compile: {cold:.1f} s cold, {warm:.1f} s warm", flush=True)
    path = results_path(args.out, results)
    flop_per_row = {entry["resolution"]: entry["flop_per_image_step"] for entry in results["flops"]}
    for width, height in resolutions:
        request_class = RequestClass(width, height, args.steps)
        for batch_size in args.batch_sizes:
            try:
                measured = measure_quietly(
                    bench,
                    request_class,
                    batch_size,
                    args.min_batches,
                    0.0,
                    args.retries,
                    progress=_quiet,
                )
            except BatchTooLarge as error:
                print(f"  {error}: larger batches skipped", flush=True)
                break
            point = mfu_point(
                setting.name,
                request_class,
                batch_size,
                measured.images_per_s,
                measured.ms_per_step,
                flop_per_row[f"{width}x{height}"],
                results["peak"]["tflops"],
            )
            point["batch_seconds"] = [round(s, 4) for s in measured.batch_seconds]
            point["background_cpu"] = round(measured.background_cpu, 2)
            results["points"].append(point)
            write_json(results, path)  # a run stopped part way keeps its points
            print(
                f"  {point['resolution']} batch {batch_size}: {point['images_per_s']:.3f} img/s, "
                f"{point['ms_per_step']:.1f} ms/step, {point['tflops']:.3g} TFLOP/s, "
                f"MFU {point['mfu']:.3f}",
                flush=True,
            )


def mfu_point(
    setting: str,
    request_class: RequestClass,
    batch_size: int,
    images_per_s: float,
    ms_per_step: float,
    flop_per_image_step: int,
    peak_tflops: float,
) -> dict[str, Any]:
    """One measured point with its achieved rate and MFU (FLOPs of the batch's real rows only:
    padding to a compile bucket is not useful work)."""
    tflops = batch_size * flop_per_image_step / (ms_per_step / 1000) / 1e12
    return {
        "setting": setting,
        "resolution": f"{request_class.width}x{request_class.height}",
        "steps": request_class.steps,
        "batch_size": batch_size,
        "images_per_s": images_per_s,
        "ms_per_step": ms_per_step,
        "tflop_per_step": batch_size * flop_per_image_step / 1e12,
        "tflops": tflops,
        "mfu": tflops / peak_tflops,
    }


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The MFU target per resolution: the best point of any setting and batch size."""
    targets = []
    for entry in results["flops"]:
        points = [p for p in results["points"] if p["resolution"] == entry["resolution"]]
        if not points:
            continue
        best = max(points, key=lambda point: point["mfu"])
        passed = best["mfu"] >= MFU_TARGET
        targets.append(
            {
                "resolution": entry["resolution"],
                "best_mfu": best["mfu"],
                "setting": best["setting"],
                "batch_size": best["batch_size"],
                "passed": passed,
                "line": f"{'PASS' if passed else 'MISS'} MFU >= {MFU_TARGET} at "
                f"{entry['resolution']}: {best['mfu']:.3f} ({best['setting']}, batch "
                f"{best['batch_size']})",
            }
        )
    return targets


def merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from runs on the same device: their points, compile times and resolutions
    together. Each point keeps the MFU against its own run's peak."""
    merged = {**runs[0], "points": [], "compile": [], "flops": [], "peaks": []}
    # The attention kernels are measured once, by whichever run did.
    merged["attention"] = next((run["attention"] for run in runs if run.get("attention")), None)
    for run in runs:
        merged["points"] += run["points"]
        merged["compile"] += run["compile"]
        merged["peaks"].append(run["peak"]["tflops"])
        known = {entry["resolution"] for entry in merged["flops"]}
        merged["flops"] += [entry for entry in run["flops"] if entry["resolution"] not in known]
    if len(runs) > 1:
        merged["command"] = " ; ".join(run["command"] for run in runs)
        merged["wall_s"] = sum(run.get("wall_s", 0) for run in runs)
    merged["targets"] = evaluate(merged)
    return merged


def results_path(out: Path, results: dict[str, Any]) -> Path:
    """One file per device kind, so the CPU and GPU results sit side by side."""
    return out / f"mfu-{_kind(results)}.json"


def update_markdown(results: dict[str, Any], markdown: Path) -> None:
    write_block(markdown, f"bench-mfu:{_kind(results)}", "bench-mfu", summary_lines(results))


def summary_lines(results: dict[str, Any]) -> list[str]:
    machine = results["machine"]
    peak = results["peak"]
    hardware = machine.get("gpu") if _kind(results) == "cuda" else machine["cpu_model"]
    lines = [
        f"Measured {machine['date'][:10]} on {hardware} (torch {machine['torch']}, "
        f"{results['model']['dtype']}, transformer of "
        f"{results['model']['transformer_parameters'] / 1e9:.2f} B parameters) with "
        f"`{results['command']}`, {results.get('wall_s', 0) / 60:.1f} min.",
        "",
        f"- Peak: **{peak['tflops']:.3g} TFLOP/s**, the best {peak['dtype']} matmul "
        f"({peak['size']} x {peak['size']} x {peak['size']}) measured on this device.",
    ]
    peaks = results.get("peaks", [])
    if len(peaks) > 1:
        lines.append(
            f"  The {len(peaks)} runs merged here measured "
            f"{', '.join(f'{value:.3g}' for value in peaks)}; each point's MFU uses its own run's."
        )
    for entry in results["flops"]:
        lines.append(
            f"- Work: {entry['flop_per_image_step'] / 1e12:.4g} TFLOP per image per step at "
            f"{entry['resolution']} ({entry['text_tokens']} text tokens), counted by "
            "`torch.utils.flop_counter`."
        )
    if _kind(results) == "cpu":
        lines += ["", "The MFU target is set for the GPU; here it is only computed."]
    lines += ["", *(f"**{t['line']}**  " for t in results.get("targets", []))]
    lines += [
        "",
        "| setting | resolution | batch | images/s | ms/step | TFLOP/s | MFU |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for point in results["points"]:
        lines.append(
            f"| {point['setting']} | {point['resolution']} | {point['batch_size']} | "
            f"{point['images_per_s']:.3f} | {point['ms_per_step']:.1f} | "
            f"{point['tflops']:.3g} | {point['mfu']:.3f} |"
        )
    if results["compile"]:
        lines += [
            "",
            "| setting | start-up compile, cold (s) | warm on-disk cache (s) | "
            "best images/s (any batch) |",
            "|---|---:|---:|---:|",
        ]
        for entry in results["compile"]:
            lines.append(
                f"| {entry['setting']} | {entry['cold_s']:.1f} | {entry['warm_s']:.1f} | "
                f"{_best_rate(results, entry['setting'])} |"
            )
        if any(point["setting"] == "eager" for point in results["points"]):
            lines.append(f"| eager | 0 | 0 | {_best_rate(results, 'eager')} |")
    if results.get("attention"):
        lines += ["", *attention.summary_lines(results["attention"], _steps_of(results))]
    return lines


def _steps_of(results: dict[str, Any]) -> dict[str, float]:
    """ms per step of an eager call as large as the attention call, by resolution."""
    rows = results["attention"]["rows"]
    return {
        point["resolution"]: point["ms_per_step"]
        for point in results["points"]
        if point["setting"] == "eager" and point["batch_size"] == rows
    }


def _best_rate(results: dict[str, Any], setting: str) -> str:
    """Best images/s of `setting` per resolution, e.g. `1.23 (1024x1024)`."""
    rates = []
    for entry in results["flops"]:
        points = [
            p["images_per_s"]
            for p in results["points"]
            if p["setting"] == setting and p["resolution"] == entry["resolution"]
        ]
        if points:
            rates.append(f"{max(points):.3f} ({entry['resolution']})")
    return ", ".join(rates) or "-"


def _quiet(line: str) -> None:
    """Progress of `measure_quietly`: only its retries are worth a line here."""
    if "measuring again" in line:
        print(line, flush=True)


def _kind(results: dict[str, Any]) -> str:
    return "cuda" if str(results["machine"]["device"]).startswith("cuda") else "cpu"
