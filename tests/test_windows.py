"""mvitv2.ops.windows: the window partition and its inverse give the windows cut one by one (zero
padded), write every element of their outputs, add the residual exactly, have each other as
gradients, and use the plain ops for the unfused baseline and while tracing."""

from __future__ import annotations

import pytest
import torch

from mvitv2.ops import windows as windows_ops
from mvitv2.ops.windows import window_partition, window_unpartition

# (grid, window): whole windows only, a partial last row and column, a window larger than the grid
CASES = [((8, 8), 4), ((10, 7), 4), ((5, 9), 3), ((3, 2), 4), ((7, 4), 7)]
# (lead, rest) around the token axis
LAYOUTS = [((), (3, 5)), ((3,), (5,)), ((2, 3), (4,)), ((2,), ())]


@pytest.fixture
def nan_memory(monkeypatch):
    """New tensors start as NaN, so an element the code under test never writes shows."""

    def new_empty(self, *size, **kw):
        return torch.full(size[0] if len(size) == 1 else size, float("nan"), **kw).to(
            kw.get("dtype", self.dtype)
        )

    monkeypatch.setattr(torch.Tensor, "new_empty", new_empty)


def _graph(t: torch.Tensor) -> set[str]:
    """The names of the autograd nodes that produced ``t``."""
    names, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            todo.extend(n for n, _ in node.next_functions)
    return names


def _naive_partition(x: torch.Tensor, hw, window: int, n_lead: int) -> torch.Tensor:
    """Windows cut one by one (row-major per image) from the grid padded with zeros."""
    H, W = hw
    grid = x.unflatten(n_lead + 1, (H, W)).movedim((n_lead + 1, n_lead + 2), (1, 2))
    Hp, Wp = -(-H // window) * window, -(-W // window) * window
    padded = grid.new_zeros(grid.shape[0], Hp, Wp, *grid.shape[3:])
    padded[:, :H, :W] = grid
    out = []
    for b in range(grid.shape[0]):
        for i in range(0, Hp, window):
            for j in range(0, Wp, window):
                win = padded[b, i : i + window, j : j + window].flatten(0, 1)  # (w*w, ...)
                out.append(win.movedim(0, n_lead))
    return torch.stack(out)


def _naive_unpartition(parts: torch.Tensor, hw, window: int, n_lead: int) -> torch.Tensor:
    """Each window's tokens written back one by one to their grid position, padding dropped."""
    H, W = hw
    nh, nw = -(-H // window), -(-W // window)
    B = parts.shape[0] // (nh * nw)
    lead, rest = parts.shape[1 : n_lead + 1], parts.shape[n_lead + 2 :]
    grid = parts.new_zeros(B, H, W, *lead, *rest)
    for n, win in enumerate(parts):
        b, i, j = n // (nh * nw), n // nw % nh, n % nw
        win = win.movedim(n_lead, 0)  # (w*w, *lead, *rest)
        for t in range(window * window):
            r, c = i * window + t // window, j * window + t % window
            if r < H and c < W:
                grid[b, r, c] = win[t]
    return grid.flatten(1, 2).movedim(1, n_lead + 1)


@pytest.mark.parametrize(("hw", "window"), CASES)
@pytest.mark.parametrize(("lead", "rest"), LAYOUTS)
@pytest.mark.parametrize("plain", [False, True])
def test_partition_cuts_zero_padded_row_major_windows(nan_memory, hw, window, lead, rest, plain):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *lead, hw[0] * hw[1], *rest, generator=g)
    got, padded = window_partition(x, hw, window, len(lead) + 1, plain)
    assert padded == (-(-hw[0] // window) * window, -(-hw[1] // window) * window)
    assert torch.equal(got, _naive_partition(x, hw, window, len(lead)))


@pytest.mark.parametrize(("hw", "window"), CASES)
@pytest.mark.parametrize(("lead", "rest"), LAYOUTS)
@pytest.mark.parametrize("plain", [False, True])
def test_unpartition_writes_tokens_back_and_adds_the_residual(
    nan_memory, hw, window, lead, rest, plain
):
    g = torch.Generator().manual_seed(1)
    nw = -(-hw[0] // window) * -(-hw[1] // window)
    parts = torch.randn(2 * nw, *lead, window * window, *rest, generator=g)
    res = torch.randn(2, *lead, hw[0] * hw[1], *rest, generator=g)
    padded = (-(-hw[0] // window) * window, -(-hw[1] // window) * window)
    d = len(lead) + 1
    want = _naive_unpartition(parts, hw, window, len(lead))
    assert torch.equal(window_unpartition(parts, window, padded, hw, d, None, plain), want)
    got = window_unpartition(parts, window, padded, hw, d, res, plain)
    assert torch.equal(got, want + res)


@pytest.mark.parametrize(("hw", "window"), [((10, 7), 4), ((8, 8), 4), ((5, 9), 3)])
def test_window_partition_cuts_row_major_windows_in_both_layouts(hw, window):
    H, W = hw
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, H * W, 3, 5, generator=g)  # (B, H*W, nH, C): token-major
    want = _naive_partition(tokens, hw, window, 0)  # (B*nW, w*w, nH, C)
    got, padded = window_partition(tokens, hw, window, token_dim=1)
    assert padded == (-(-H // window) * window, -(-W // window) * window)
    assert torch.equal(got, want)
    assert torch.equal(window_unpartition(got, window, padded, hw, token_dim=1), tokens)
    heads = tokens.transpose(1, 2)  # (B, nH, H*W, C): head-major, token axis -2
    got_h, _ = window_partition(heads, hw, window)
    assert torch.equal(got_h, want.transpose(1, 2))
    assert torch.equal(window_unpartition(got_h, window, padded, hw), heads)


def test_unpartition_of_transposed_windows_and_promoted_residual():
    # attention hands its output over as a (B*nW, N, nH, C) view of (B*nW, nH, N, C) memory
    parts = torch.randn(2 * 6, 2, 16, 3).transpose(1, 2)
    res = torch.randn(2, 10 * 7, 2, 3, dtype=torch.float64)
    got = window_unpartition(parts, 4, (12, 8), (10, 7), 1, res)
    want = window_unpartition(parts, 4, (12, 8), (10, 7), 1, res, plain=True)
    assert got.dtype == torch.float64 and torch.equal(got, want)
    low = window_unpartition(parts.bfloat16(), 4, (12, 8), (10, 7), 1, res.float())
    assert low.dtype == torch.float32
    assert torch.equal(low, _naive_unpartition(parts.bfloat16(), (10, 7), 4, 0) + res.float())


@pytest.mark.parametrize(("hw", "window"), [((5, 6), 4), ((4, 4), 2), ((2, 3), 3)])
@pytest.mark.parametrize(("lead", "rest"), [((), (2, 3)), ((2,), (3, 2)), ((2, 1), ())])
def test_gradients_are_the_adjoint_copies(hw, window, lead, rest):
    g = torch.Generator().manual_seed(2)
    shape = (2, *lead, hw[0] * hw[1], *rest)
    x = torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
    d = len(lead) + 1
    part = lambda t: window_partition(t, hw, window, d)[0]  # noqa: E731
    assert "_ToWindowsBackward" in _graph(part(x))
    torch.autograd.gradcheck(part, (x,))
    torch.autograd.gradgradcheck(part, (x,))
    parts = part(x).detach().requires_grad_()
    res = torch.randn_like(x).requires_grad_()
    padded = (-(-hw[0] // window) * window, -(-hw[1] // window) * window)
    unpart = lambda t, r: window_unpartition(t, window, padded, hw, d, r)  # noqa: E731
    assert "_FromWindowsBackward" in _graph(unpart(parts, res))
    torch.autograd.gradcheck(unpart, (parts, res))
    torch.autograd.gradgradcheck(unpart, (parts, res))
    # the same gradients as the plain ops', bit for bit, in the inputs' dtypes
    dy = torch.randn(shape, generator=g)
    p32, r16 = parts.detach().float().requires_grad_(), res.detach().bfloat16().requires_grad_()
    fast = torch.autograd.grad(window_unpartition(p32, window, padded, hw, d, r16), (p32, r16), dy)
    plain = window_unpartition(p32, window, padded, hw, d, r16, plain=True)
    want = torch.autograd.grad(plain, (p32, r16), dy)
    assert [t.dtype for t in fast] == [torch.float32, torch.bfloat16]
    assert all(torch.equal(a, b) for a, b in zip(fast, want))


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated")
def test_plain_ops_while_tracing(monkeypatch):
    x = torch.randn(1, 10 * 7, 2, 3, requires_grad=True)
    monkeypatch.setattr(windows_ops, "tracing", lambda: True)
    parts, padded = window_partition(x, (10, 7), 4, 1)
    back = window_unpartition(parts, 4, padded, (10, 7), 1, x)
    assert not _graph(back) & {"_ToWindowsBackward", "_FromWindowsBackward"}
    assert torch.equal(back, 2 * x)
    traced = torch.jit.trace(lambda t: window_partition(t, (10, 7), 4, 1)[0], x.detach())
    monkeypatch.undo()
    assert torch.equal(traced(x.detach() + 1), window_partition(x.detach() + 1, (10, 7), 4, 1)[0])
