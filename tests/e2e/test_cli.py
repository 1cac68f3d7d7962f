"""The `imagegen` CLI against a real server process, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from .conftest import launch

BIN = Path(sys.executable).parent


def imagegen(server: object, *args: str | bytes) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "imagegen"), "--target", server.target, *args],  # type: ignore[attr-defined]
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_generate_writes_a_png_of_the_asked_size(server_process: object, tmp_path: Path) -> None:
    output = tmp_path / "out.png"
    result = imagegen(
        server_process,
        "generate",
        "a red fox in snow",
        "-o",
        str(output),
        "--steps",
        "4",
        "--seed",
        "42",
        "--size",
        "96x64",
    )
    assert result.returncode == 0, result.stderr
    with Image.open(output) as image:
        assert image.format == "PNG" and image.size == (96, 64)
    assert "seed=42" in result.stdout


def test_several_images_get_numbered_files_and_the_format_follows_the_extension(
    server_process: object, tmp_path: Path
) -> None:
    result = imagegen(
        server_process,
        "generate",
        "two cats",
        "-o",
        str(tmp_path / "cat.jpg"),
        "--num-images",
        "2",
        "--seed",
        "7",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    for index, seed in ((0, 7), (1, 8)):
        with Image.open(tmp_path / f"cat-{index}.jpg") as image:
            assert image.format == "JPEG" and image.size == (64, 64)
        assert f"seed={seed}" in result.stdout


def test_bad_input_is_reported_with_the_status_and_field(
    server_process: object, tmp_path: Path
) -> None:
    result = imagegen(
        server_process, "generate", "x", "-o", str(tmp_path / "x.png"), "--size", "100x64"
    )
    assert result.returncode == 1
    assert "INVALID_ARGUMENT: width: 100 is not a multiple of 16" in result.stderr
    result = imagegen(
        server_process, "generate", "x", "-o", str(tmp_path / "x.png"), "--variant", "lightning-8"
    )
    assert result.returncode == 1
    assert "NOT_FOUND: variant: 'lightning-8' is not a variant of this server" in result.stderr


def test_arguments_no_request_can_carry_and_unreadable_files_end_without_a_traceback(
    server_process: object, tmp_path: Path
) -> None:
    output = str(tmp_path / "x.png")
    for option, value in (
        ("--steps", "3000000000"),
        ("--seed", str(2**64)),
        ("--size", "64x99999999999"),
    ):
        result = imagegen(server_process, "generate", "x", "-o", output, option, value)
        assert result.returncode == 2 and f"argument {option}: " in result.stderr
        assert "Traceback" not in result.stderr
    result = imagegen(server_process, "edit", str(tmp_path / "absent.png"), "x", "-o", output)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("imagegen: ") and "absent.png" in result.stderr


def test_arguments_that_would_crash_the_process_or_the_call_are_refused(
    server_process: object, tmp_path: Path
) -> None:
    output = str(tmp_path / "x.png")
    not_utf8 = b"caf\xe9"  # the shell passes bytes; a request's strings must be UTF-8
    for args, complaint in (
        (("generate", not_utf8, "-o", output), "argument prompt: "),
        (("generate", "x", "-o", output, "--request-id", not_utf8), "argument --request-id: "),
        (("generate", "x", "-o", output, "--negative-prompt", not_utf8), "--negative-prompt: "),
        (("--timeout", "inf", "info"), "argument --timeout: "),
        (("--timeout", "-1", "info"), "argument --timeout: "),
        # gRPC aborts the process on half a client key pair; it never gets that far.
        (("--client-cert", output, "info"), "--client-cert and --client-key go together"),
        (("--tls", "--client-key", output, "info"), "--client-cert and --client-key go together"),
    ):
        result = imagegen(server_process, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert complaint in result.stderr and "Traceback" not in result.stderr


def test_info_and_health(server_process: object) -> None:
    info = imagegen(server_process, "info")
    assert info.returncode == 0, info.stderr
    parsed = json.loads(info.stdout)
    assert parsed["limits"]["size_multiple"] == 16 and parsed["batching"]["policy"] == "step"
    assert "npy" in parsed["limits"]["output_formats"]
    health = imagegen(server_process, "health")
    assert (health.returncode, health.stdout.strip()) == (0, "SERVING")


def test_edit_writes_an_edited_image_and_inpaints_with_a_mask(
    server_process: object, tmp_path: Path
) -> None:
    source, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.new("RGB", (96, 64), (200, 40, 40)).save(source)
    Image.new("L", (96, 64), 255).save(mask)
    for extra, name in (([], "edited.png"), (["--mask", str(mask)], "inpainted.png")):
        result = imagegen(
            server_process,
            "edit",
            str(source),
            "a red barn",
            "--strength",
            "0.6",
            "--seed",
            "3",
            "-o",
            str(tmp_path / name),
            *extra,
        )
        assert result.returncode == 0, result.stderr
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.size == (96, 64)  # the init image's size


def test_generate_with_an_idempotency_key_is_safe_to_repeat_and_cancel_names_the_field(
    server_process: object, tmp_path: Path
) -> None:
    outputs = [tmp_path / "first.png", tmp_path / "again.png"]
    for output in outputs:
        result = imagegen(
            server_process,
            "generate",
            "a lighthouse",
            "-o",
            str(output),
            "--seed",
            "3",
            "--idempotency-key",
            "cli-key-1",
            "--no-progress",
        )
        assert result.returncode == 0, result.stderr
    assert outputs[0].read_bytes() == outputs[1].read_bytes()
    result = imagegen(server_process, "cancel", "--request-id", "nothing-here")
    assert result.returncode == 1
    assert "NOT_FOUND" in result.stderr and "request_id" in result.stderr
    result = imagegen(server_process, "cancel", "--idempotency-key", "cli-key-1")
    assert result.returncode == 1 and "already finished" in result.stderr


def test_edit_with_references_writes_the_edit_and_is_refused_by_a_text_to_image_server(
    server_process: object, tmp_path: Path
) -> None:
    model = tmp_path / "edit-plus"
    written = subprocess.run(
        [str(BIN / "imagegen-server"), "tiny-model", str(model), "--pipeline", "edit-plus"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert written.returncode == 0, written.stderr
    first, second = tmp_path / "cat.png", tmp_path / "sofa.jpg"
    Image.new("RGB", (96, 64), (200, 40, 40)).save(first)
    Image.new("RGB", (48, 48), (40, 40, 200)).save(second)
    options = ("-r", str(first), "-r", str(second), "--size", "64x48", "--steps", "2")
    refused = imagegen(
        server_process, "edit-with-references", "x", *options, "-o", str(tmp_path / "no.png")
    )
    assert refused.returncode == 1
    assert "INVALID_ARGUMENT: reference_images: 2 given" in refused.stderr

    server = launch(model)
    try:
        server.wait_serving()
        info = json.loads(imagegen(server, "info").stdout)
        assert (info["pipeline"], info["limits"]["max_reference_images"]) == ("edit-plus", 3)
        output = tmp_path / "cat-on-sofa.png"
        instruction = "put the cat from picture 1 on the sofa from picture 2"
        result = imagegen(server, "edit-with-references", instruction, *options, "-o", str(output))
        assert result.returncode == 0, result.stderr
        with Image.open(output) as image:
            assert image.format == "PNG" and image.size == (64, 48)
    finally:
        server.stop(grace_s=60)
