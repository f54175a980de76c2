"""The small utilities by value: a validated process-wide choice, and parameter and
multiply-accumulate counts against counts made by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mvitv2.utils.choice import Choice
from mvitv2.utils.flops import count_macs, count_params, macs_of


# ---------------------------------------------------------------------- Choice
def test_a_choice_starts_at_a_valid_value_and_refuses_an_unknown_one_naming_the_valid_ones():
    assert Choice("GEMM backend", ("auto", "torch"), "torch").value == "torch"
    with pytest.raises(ValueError) as e:
        Choice("GEMM backend", ("auto", "torch"), "fast")
    assert str(e.value) == "unknown GEMM backend 'fast'; valid: ('auto', 'torch')"


def test_set_returns_the_previous_value_and_an_unknown_value_leaves_it_unchanged():
    c = Choice("path", ("a", "b", "c"), "a")
    assert c.check("b") == "b" and c.value == "a"  # check only validates
    assert c.set("b") == "a" and c.value == "b"
    assert c.set("c") == "b" and c.value == "c"
    with pytest.raises(ValueError, match=r"^unknown path 'd'; valid: \('a', 'b', 'c'\)$"):
        c.set("d")
    assert c.value == "c"


def test_using_sets_the_value_inside_the_block_and_restores_it_after_an_error_too():
    c = Choice("path", ("a", "b", "c"), "a")
    with c.using("b"):
        assert c.value == "b"
        with c.using("c"):
            assert c.value == "c"
        assert c.value == "b"
    assert c.value == "a"
    with pytest.raises(KeyError), c.using("c"):
        raise KeyError("inside")
    assert c.value == "a"
    with pytest.raises(ValueError), c.using("z"):
        pass
    assert c.value == "a"


# ---------------------------------------------------------------------- counts
def test_count_params_counts_each_parameter_once_also_on_the_meta_device():
    shared = nn.Linear(3, 4)  # 3 x 4 weights + 4 biases
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 2, bias=False))
    assert count_params(model) == (12 + 4) + 8
    assert count_params(nn.Linear(300, 200, device="meta")) == 300 * 200 + 200


def test_macs_of_is_half_the_flops_as_an_int_and_gives_the_result_without_grad():
    w = torch.randn(3, 4, requires_grad=True)
    x = torch.randn(2, 3)
    macs, out = macs_of(lambda a: a @ w, x)
    assert macs == 2 * 3 * 4 and type(macs) is int
    assert torch.equal(out, (x @ w).detach()) and not out.requires_grad
    macs, out = macs_of(torch.bmm, torch.ones(5, 2, 3), torch.ones(5, 3, 7))  # several args
    assert macs == 5 * 2 * 3 * 7 and out.shape == (5, 2, 7)


def test_count_macs_of_a_model_on_its_device_from_an_input_shape():
    linear = nn.Linear(3, 4, device="meta")
    assert count_macs(linear, (5, 3)) == 5 * 3 * 4  # the input is made on the meta device too
    conv = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 10))
    # each of the 4 x 3 x 3 outputs of the 5 x 5 image sums 2 x 3 x 3 products; then 36 x 10
    assert count_macs(conv, (1, 2, 5, 5)) == 4 * 3 * 3 * (2 * 3 * 3) + 36 * 10
