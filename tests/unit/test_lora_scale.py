"""A request's adapter scale in a bfloat16 model: applied as PEFT applies its Python float."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from imagegen_server.base.types import AdapterSpec
from imagegen_server.engine.lora import LoraBank
from safetensors.torch import save_file
from torch import nn


def test_a_row_scale_rounds_once_in_a_bfloat16_model(tmp_path: Path) -> None:
    """In bfloat16 the scale 0.7 is 0.69921875; PEFT multiplies the delta by the float 0.7
    (computed in float32, rounded once), so the served delta must too."""
    generator = torch.Generator("cpu").manual_seed(0)
    model = nn.Module()
    model.proj = nn.Linear(64, 64).to(torch.bfloat16)
    down = torch.randn(4, 64, generator=generator)
    up = torch.randn(64, 4, generator=generator)
    path = tmp_path / "a.safetensors"
    save_file({"transformer.proj.lora_A.weight": down, "transformer.proj.lora_B.weight": up}, path)
    bank = LoraBank(model)
    bank.load("a", path)
    bank.wrap_all()
    x = torch.randn(2, 8, 64, generator=generator).to(torch.bfloat16)
    with torch.inference_mode(), bank.applied([(AdapterSpec("a", 0.7),)] * 2):
        served = model.proj(x)
    with torch.inference_mode():
        base = model.proj.base(x)
        lora = F.linear(F.linear(x, down.to(torch.bfloat16)), up.to(torch.bfloat16))
        peft = base + lora * 0.7  # PEFT: result + lora_B(lora_A(x)) * scaling
    assert torch.equal(served, peft)
