"""mhc_torch.HistoryBuffer: eviction order, detaching, moving with its model."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from mhc_torch import HistoryBuffer, MHCSkip


@given(h=st.integers(1, 6), n=st.integers(0, 15))
def test_keeps_the_last_h_states_oldest_first(h, n):
    buffer = HistoryBuffer(max_history=h)
    states = [torch.full((2,), float(i)) for i in range(n)]
    for s in states:
        buffer.append(s)
    assert len(buffer) == min(n, h)
    assert [s is t for s, t in zip(buffer.get(), states[-h:], strict=True)] == [True] * min(n, h)


def test_get_returns_a_copy_and_clear_empties():
    buffer = HistoryBuffer(3)
    buffer.append(torch.zeros(1))
    window = buffer.get()
    window.append(torch.ones(1))
    assert len(buffer) == 1
    buffer.clear()
    assert len(buffer) == 0 and buffer.get() == []


@pytest.mark.parametrize("detach", [False, True])
def test_detach_history_cuts_the_graph(detach):
    buffer = HistoryBuffer(2, detach_history=detach)
    x = torch.ones(3, requires_grad=True)
    buffer.append(x * 2)
    (stored,) = buffer.get()
    assert stored.requires_grad is not detach
    assert (stored.grad_fn is None) is detach
    torch.testing.assert_close(stored, torch.full((3,), 2.0))


def test_states_move_with_the_module_that_holds_it():
    # Seed FAQ 3: moving a model moves its history (dtype here; device on GPU machines).
    model = nn.Module()
    model.buffer = HistoryBuffer(2)
    model.buffer.append(torch.ones(2))
    model.buffer.append(torch.arange(2))  # integer states keep their dtype
    model.double()
    assert [s.dtype for s in model.buffer.get()] == [torch.float64, torch.int64]
    model.to(torch.float16)
    assert model.buffer.get()[0].dtype == torch.float16
    assert model.state_dict() == {}  # transient states are not checkpointed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_states_follow_cuda_and_back():
    model = nn.Module()
    model.buffer = HistoryBuffer(2)
    model.buffer.append(torch.ones(2))
    model.cuda()
    assert model.buffer.get()[0].is_cuda
    model.cpu()
    assert not model.buffer.get()[0].is_cuda


def test_a_skip_takes_the_buffer_itself():
    skip = MHCSkip(max_history=3, init="uniform")
    buffer = HistoryBuffer(3)
    for i in range(4):
        buffer.append(torch.full((2,), float(i)))
    x = torch.zeros(2)
    torch.testing.assert_close(skip(x, buffer), skip(x, buffer.get()))
    torch.testing.assert_close(skip(x, buffer), torch.full((2,), 2.0))  # mean of 1, 2, 3


@pytest.mark.parametrize("h", [0, -2, 1.5, True])
def test_max_history_must_be_a_positive_int(h):
    with pytest.raises(ValueError, match=f"max_history must be an int >= 1, got {h!r}"):
        HistoryBuffer(h)


def test_append_takes_tensors_only():
    with pytest.raises(TypeError, match="expects a tensor, got list"):
        HistoryBuffer(2).append([1.0])
