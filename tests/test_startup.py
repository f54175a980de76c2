"""Start-up cost: listing the released weights and ``mvitv2 info`` import neither torchvision
(whose import pulls in torch._dynamo, seconds) nor, for the weights, the model code."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torchvision.ops import stochastic_depth

from mvitv2.models.mvit import DropPath


def test_weights_listing_and_info_import_neither_torchvision_nor_dynamo():
    """One interpreter (one torch import): the registry lists without the model code;
    ``info --weights`` imports neither torchvision nor torch._dynamo; ``info`` with its FLOP
    counts no torchvision (torch's FLOP counter itself imports torch._dynamo)."""
    code = (
        "import sys, mvitv2, mvitv2.cli\n"
        "def loaded(*names):\n    return [m for m in names if m in sys.modules]\n"
        "assert len(mvitv2.weights.list_weights()) > 0\n"
        "print('list', loaded('mvitv2.models', 'mvitv2.weights.load', 'torchvision'))\n"
        "assert mvitv2.cli.main(['info', '--weights', '--filter', 'mvitv2_tiny']) == 0\n"
        "print('info --weights', loaded('torchvision', 'torch._dynamo', 'mvitv2.models'))\n"
        "assert mvitv2.cli.main(['info', '--filter', 'mvitv2_tiny', '--forward', '']) == 0\n"
        "print('info', loaded('torchvision'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert {"list []", "info --weights []", "info []"} <= set(lines), done.stdout
    assert any(line.startswith("mvitv2_tiny ") and "224x224" in line for line in lines)


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_drop_path_draws_and_scales_as_torchvision_stochastic_depth(p):
    x = torch.randn(64, 5, 3)
    module = DropPath(p)
    torch.manual_seed(1)
    got = module(x)
    torch.manual_seed(1)
    want = stochastic_depth(x, p, "row", training=True)
    assert torch.equal(got, want)
    assert torch.equal(module.eval()(x), x)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        DropPath(1.5)
