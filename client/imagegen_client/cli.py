"""`imagegen`: generate images, inspect and health-check an imagegen server from the shell.

imagegen generate "a red fox in snow" -o fox.png --steps 8 --seed 42 --size 1024x1024
imagegen generate "a red fox in snow" -o fox.png --idempotency-key fox-1   (safe to repeat)
imagegen cancel --idempotency-key fox-1
imagegen edit-with-references "the cat from picture 1 on the sofa" -r cat.png -r sofa.png -o a.png
imagegen info
imagegen health
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import grpc

from .client import DEFAULT_TARGET, ImageGenClient, TlsConfig
from .types import Adapter, Completed, GenerationResult, OutputFormat, Queued, Started, Step

EXTENSIONS = {
    OutputFormat.PNG: ".png",
    OutputFormat.JPEG: ".jpg",
    OutputFormat.WEBP: ".webp",
    OutputFormat.NPY: ".npy",
}


INT32 = (-(2**31), 2**31 - 1)  # the request's int32 fields
INT64 = (-(2**63), 2**63 - 1)  # the seed


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if bool(args.client_cert) != bool(args.client_key):
        parser.error("--client-cert and --client-key go together (mutual TLS)")
    try:
        with _client(args) as client:
            return int(args.handler(client, args))
    except grpc.RpcError as error:
        print(f"imagegen: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    # A file (image, mask, certificate, output) it cannot read or write, or the `cli` extra's
    # grpcio-health-checking missing for `health`.
    except (OSError, ImportError) as error:
        print(f"imagegen: {error}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagegen", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("IMAGEGEN_TARGET", DEFAULT_TARGET),
        help="server address (env IMAGEGEN_TARGET)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("IMAGEGEN_TOKEN"),
        help="bearer token (env IMAGEGEN_TOKEN)",
    )
    parser.add_argument("--tls", action="store_true", help="use TLS")
    parser.add_argument("--ca-cert", help="PEM roots to verify the server (implies --tls)")
    parser.add_argument("--client-cert", help="PEM client certificate for mutual TLS")
    parser.add_argument("--client-key", help="PEM client key for mutual TLS")
    parser.add_argument(
        "--timeout", type=_seconds, default=None, help="overall deadline in seconds (> 0)"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate images from a prompt")
    generate.add_argument("prompt", type=_text)
    _add_generation_options(generate)
    generate.set_defaults(handler=_generate)

    edit = commands.add_parser(
        "edit", help="image-to-image (SDEdit) of an init image, or inpainting with --mask"
    )
    edit.add_argument("image", type=Path, help="the init image (PNG, JPEG or WebP)")
    edit.add_argument("prompt", type=_text)
    edit.add_argument(
        "--strength", type=float, default=None, help="[1e-6, 1]; default: the server's"
    )
    edit.add_argument("--mask", type=Path, default=None, help="white = regenerate, black = keep")
    _add_generation_options(edit)
    edit.set_defaults(handler=_generate)

    cancel = commands.add_parser(
        "cancel", help="cancel a queued or running request by its idempotency key or request id"
    )
    target = cancel.add_mutually_exclusive_group(required=True)
    target.add_argument("--idempotency-key", type=_text, default="")
    target.add_argument("--request-id", type=_text, default="")
    cancel.set_defaults(handler=_cancel)

    references = commands.add_parser(
        "edit-with-references",
        help="instruction editing from 1-3 reference images (a Qwen-Image-Edit/Edit-Plus server)",
    )
    references.add_argument("prompt", metavar="instruction", type=_text)
    references.add_argument(
        "-r",
        "--reference",
        dest="references",
        action="append",
        required=True,
        type=Path,
        help="a reference image (PNG, JPEG or WebP); repeat for Picture 1, 2, 3 in order",
    )
    _add_generation_options(references)
    references.set_defaults(handler=_generate)

    info = commands.add_parser("info", help="print the server's model, limits and batching as JSON")
    info.set_defaults(handler=_info)
    health = commands.add_parser(
        "health", help="print the grpc.health.v1 status; exit 0 if SERVING"
    )
    health.add_argument("--service", type=_text, default="")
    health.set_defaults(handler=_health)
    return parser


def _add_generation_options(generate: argparse.ArgumentParser) -> None:
    """The options `generate`, `edit` and `edit-with-references` share."""
    generate.add_argument(
        "-o", "--output", required=True, type=Path, help="file; with --num-images N, NAME-i.EXT"
    )
    generate.add_argument("--negative-prompt", type=_text, default="")
    generate.add_argument(
        "--size", type=_size, default=(0, 0), help="WIDTHxHEIGHT (default: the server's)"
    )
    generate.add_argument("--steps", type=int32, default=0)
    generate.add_argument(
        "--guidance", type=float, default=None, help="true CFG scale (> 1 turns it on)"
    )
    generate.add_argument("--seed", type=int64, default=None)
    generate.add_argument("--num-images", type=int32, default=1)
    generate.add_argument(
        "--format",
        choices=[f.name.lower() for f in OutputFormat],
        default=None,
        help="default: from the output file's extension, else png",
    )
    generate.add_argument("--quality", type=int32, default=0, help="JPEG/WebP quality 1-100")
    generate.add_argument(
        "--adapter",
        action="append",
        default=[],
        type=_adapter,
        help="NAME or NAME:SCALE; repeatable",
    )
    generate.add_argument(
        "--variant", type=_text, default="", help="a variant the server lists; default: its own"
    )
    generate.add_argument("--priority", type=int32, default=0, help="1 = highest")
    generate.add_argument("--request-id", type=_text, default="")
    generate.add_argument(
        "--idempotency-key",
        type=_text,
        default="",
        help="makes the call safe to repeat: a repeat with the same key joins the request or"
        " gets its images again, and the request runs on if this process dies",
    )
    generate.add_argument(
        "--no-progress", action="store_true", help="no progress bar (plain Generate call)"
    )


@contextmanager
def _client(args: argparse.Namespace) -> Iterator[ImageGenClient]:
    tls: TlsConfig | None = None
    if args.tls or args.ca_cert or args.client_cert or args.client_key:
        tls = TlsConfig.from_files(args.ca_cert, args.client_cert, args.client_key)
    client = ImageGenClient(args.target, tls=tls, token=args.token, timeout_s=args.timeout)
    try:
        yield client
    finally:
        client.close()


def _generate(client: ImageGenClient, args: argparse.Namespace) -> int:
    output_format = _output_format(args.format, args.output)
    width, height = args.size
    options: dict[str, Any] = {
        "negative_prompt": args.negative_prompt,
        "width": width,
        "height": height,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "seed": args.seed,
        "num_images": args.num_images,
        "output_format": output_format,
        "output_quality": args.quality,
        "adapters": args.adapter,
        "variant": args.variant,
        "priority": args.priority,
        "request_id": args.request_id,
        "idempotency_key": args.idempotency_key,
    }
    if args.command == "edit":
        options.update(init_image=args.image, strength=args.strength, mask_image=args.mask)
    if args.command == "edit-with-references":
        options.update(reference_images=args.references)
    if args.no_progress:
        result = client.generate(args.prompt, **options)
    else:
        result = _generate_with_progress(client, args.prompt, options)
    for path, image in zip(
        _output_paths(args.output, len(result.images)), result.images, strict=True
    ):
        image.save(str(path))
        print(f"{path}  {image.width}x{image.height}  seed={image.seed}")
    timings = result.timings
    print(
        f"request {result.request_id}: queued {timings.queued_s:.2f}s,"
        f" compute {timings.compute_s:.2f}s, total {timings.total_s:.2f}s,"
        f" batch size {result.batch_size}",
        file=sys.stderr,
    )
    return 0


class _Progress(Protocol):
    def update(self, text: str, completed: int, total: int) -> None: ...


def _generate_with_progress(
    client: ImageGenClient, prompt: str, options: dict[str, Any]
) -> GenerationResult:
    with _progress_display() as progress:
        for event in client.stream(prompt, **options):
            if isinstance(event, Queued):
                progress.update(f"queued #{event.position} (~{event.estimated_start_s:.1f}s)", 0, 1)
            elif isinstance(event, Started):
                progress.update(f"started (batch of {event.batch_size})", 0, 1)
            elif isinstance(event, Step):
                progress.update("denoising", event.step, event.total_steps)
            elif isinstance(event, Completed):
                return event.result
    raise RuntimeError("the stream ended without a result")


@contextmanager
def _progress_display() -> Iterator[_Progress]:
    try:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )
    except ImportError:  # the `cli` extra is not installed: plain lines on stderr
        yield _PlainProgress()
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task("connecting", total=1)

        class _Rich:
            def update(self, text: str, completed: int, total: int) -> None:
                bar.update(task, description=text, completed=completed, total=total)

        yield _Rich()


class _PlainProgress:
    def update(self, text: str, completed: int, total: int) -> None:
        print(f"{text} {completed}/{total}", file=sys.stderr)


def _cancel(client: ImageGenClient, args: argparse.Namespace) -> int:
    state = client.cancel(idempotency_key=args.idempotency_key, request_id=args.request_id)
    print(f"cancelled (it was {state})")
    return 0


def _info(client: ImageGenClient, args: argparse.Namespace) -> int:
    """Prints ServerInfo as JSON with its field names; output formats by their --format names."""
    info = client.server_info()
    fields = dataclasses.asdict(info)
    fields["limits"]["output_formats"] = [fmt.name.lower() for fmt in info.limits.output_formats]
    print(json.dumps(fields, indent=2))
    return 0


def _health(client: ImageGenClient, args: argparse.Namespace) -> int:
    status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, got {text!r}") from None
    return _in_range(width, INT32), _in_range(height, INT32)


def int32(text: str) -> int:
    return _in_range(int(text), INT32)


def int64(text: str) -> int:
    return _in_range(int(text), INT64)


def _in_range(value: int, bounds: tuple[int, int]) -> int:
    """What the request's field can carry; the server checks the range it allows."""
    low, high = bounds
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{value} outside [{low}, {high}]")
    return value


def _text(text: str) -> str:
    """A string field of the request, which must be UTF-8 (the shell may pass other bytes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid UTF-8") from None
    return text


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise argparse.ArgumentTypeError(f"seconds must be a number > 0, got {text!r}")
    return seconds


def _adapter(text: str) -> Adapter:
    name, _, scale = _text(text).partition(":")
    try:
        return Adapter(name, float(scale) if scale else 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"adapter must be NAME or NAME:SCALE, got {text!r}"
        ) from None


def _output_format(name: str | None, output: Path) -> OutputFormat:
    if name:
        return OutputFormat[name.upper()]
    by_extension = {extension: fmt for fmt, extension in EXTENSIONS.items()} | {
        ".jpeg": OutputFormat.JPEG
    }
    return by_extension.get(output.suffix.lower(), OutputFormat.PNG)


def _output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{index}{output.suffix}") for index in range(count)]


if __name__ == "__main__":
    sys.exit(main())
