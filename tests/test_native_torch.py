"""mhc_torch's C++ mixing kernel (mhc_torch/_native.py) against the Python one and against calculus."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from torch import nn

from mhc_torch import MHCSequential, MHCSkip, _native


def _stack(depth=4, width=5, dtype=torch.float32, **options) -> MHCSequential:
    torch.manual_seed(0)
    model = MHCSequential([nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)], **options)
    with torch.no_grad():
        for p in model.skip_layers.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model.to(dtype)


def _run(model, x):
    """Output, input gradient and every parameter gradient of one step."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(out.dtype)).sum().backward()
    return [out.detach(), x.grad] + [p.grad for p in model.parameters()]


@pytest.fixture
def kernel():
    k = _native.native_kernel()
    if k is None:
        pytest.skip("the C++ mixing kernel could not be built here")
    return k


def test_the_kernel_builds_wherever_there_is_a_compiler():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine: the Python kernel runs")
    assert _native.native_kernel() is not None, "a compiler is present but the kernel did not build (see the warning)"


@pytest.mark.parametrize(
    "options",
    [dict(mode="mhc"), dict(mode="hc", max_history=2), dict(mode="mhc", use_gating=True, max_history=6)],
)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_native_and_python_kernels_agree(kernel, options, layout):
    # contiguous float32 takes the fused loops (where built); a transposed
    # view takes the kernel's ATen path.
    model = _stack(**options)
    x = torch.randn(5, 3).T if layout == "transposed" else torch.randn(3, 5)
    got = _run(model, x)
    with _native.python_kernel():
        want = _run(model, x)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_loops_and_aten_ops_agree(kernel):
    if not kernel._fused_loops():
        pytest.skip("this build has no fused loops (CPU without AVX2)")
    model, x = _stack(depth=6, max_history=4), torch.randn(64, 5)
    fused = _run(model, x)
    try:
        kernel._set_fused_loops(False)
        aten = _run(model, x)
    finally:
        kernel._set_fused_loops(True)
    for a, b in zip(fused, aten, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("mix_kernel")
@pytest.mark.parametrize("mode", ["hc", "mhc"])
def test_stack_gradients_match_finite_differences(mode):
    # float64 contiguous: the fused loops in the C++ kernel. Second order
    # (create_graph) runs the kernel's differentiable ATen path.
    model = _stack(depth=3, width=4, dtype=torch.float64, mode=mode, max_history=3)
    # The logits are left out: the skips project them in float32 whatever the
    # model's dtype, too coarse for finite differences. Their gradients are
    # checked against the Python kernel above.
    names = ["wrapped_modules.0.0.weight", "wrapped_modules.2.0.bias"]
    start = dict(model.named_parameters())

    def f(x, *values):
        return torch.func.functional_call(model, dict(zip(names, values, strict=True)), (x,))

    inputs = (torch.randn(2, 4, dtype=torch.float64), *(start[n].detach().clone() for n in names))
    inputs = tuple(t.requires_grad_(True) for t in inputs)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.usefixtures("mix_kernel")
def test_a_state_changed_in_place_before_backward_is_an_error():
    skip = MHCSkip(max_history=2, mode="hc")
    h = torch.randn(3, 4, requires_grad=True)
    state = h * 1.0
    out = skip(torch.randn(3, 4), [state, state + 1])
    with torch.no_grad():
        state.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")  # torch's own import
def test_forward_mode_ad_is_refused_clearly(kernel):
    import torch.autograd.forward_ad as fwAD

    skip = MHCSkip(max_history=2, mode="hc")
    with fwAD.dual_level():
        x = fwAD.make_dual(torch.randn(3, 4), torch.randn(3, 4))
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            skip(x, [torch.randn(3, 4)])


def test_the_environment_switch_and_a_failed_build_fall_back_to_python(monkeypatch):
    monkeypatch.delitem(_native._loaded, _native._NAME, raising=False)
    monkeypatch.setenv("MHC_TORCH_NATIVE", "0")
    assert _native.native_kernel() is None
    assert MHCSkip(max_history=2)(torch.ones(2), [torch.ones(2)]).shape == (2,)

    monkeypatch.delitem(_native._loaded, _native._NAME)
    monkeypatch.delenv("MHC_TORCH_NATIVE")

    def broken():
        raise OSError("no compiler here")

    monkeypatch.setattr(_native, "_build", broken)
    with pytest.warns(RuntimeWarning, match="no compiler here.*Python implementation"):
        assert _native.native_kernel() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not on every call
        assert _native.native_kernel() is None
        model = _stack()
        assert model(torch.zeros(2, 5)).shape == (2, 5)


@pytest.mark.usefixtures("mix_kernel")
def test_a_jit_trace_records_the_mix_not_a_constant():
    model = _stack()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's own notes on Python values
        traced = torch.jit.trace(model, torch.randn(3, 5), check_trace=False)
    x = torch.randn(3, 5)
    torch.testing.assert_close(traced(x), model(x))


@pytest.mark.usefixtures("mix_kernel")
def test_fake_tensors_never_reach_the_raw_loops():
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = _stack()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        out = model(mode.from_tensor(torch.randn(3, 5)))
        out.sum().backward()
    assert out.shape == (3, 5)


def test_residual_mode_never_asks_for_the_kernel(monkeypatch):
    # It never mixes, so it must not pay for a build (or a StackSums).
    from mhc_torch import skip

    asked = []
    monkeypatch.setattr(skip, "native_kernel", lambda: asked.append(True))
    model = _stack(mode="residual")
    x = torch.randn(3, 5, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and not asked


# --- the stack's weight table ----------------------------------------------------------------

TABLE_CASES = [
    dict(mode="hc", constraint="simplex", temperature=1.0, max_history=4),
    dict(mode="hc", constraint="identity", temperature=0.7, max_history=3),
    dict(mode="mhc", constraint="simplex", temperature=1.5, max_history=5),
    dict(mode="mhc", constraint="identity", temperature=1.0, max_history=1),
    dict(mode="mhc", constraint="simplex", temperature=1.0, max_history=7),
]


def _table(kernel, model, num_states):
    from mhc_torch.skip import StackGradients

    return model._weight_table(kernel, StackGradients(), torch.zeros(1), num_states, None)


@pytest.mark.parametrize("options", TABLE_CASES)
@pytest.mark.parametrize("num_states", [1, 3])
def test_the_kernels_projection_is_layer_weights(kernel, options, num_states):
    model = _stack(depth=6, **options)
    table = _table(kernel, model, num_states)
    assert table.grad_fn.name() == "MHCWeightTableBackward"  # projected in C++, not collected
    want = model.layer_weights(num_states)
    torch.testing.assert_close(table, want, rtol=0, atol=1e-6)

    logits = [s.mixing_logits for s in model.skip_layers]
    upstream = 10 * torch.randn(table.shape)
    got = torch.stack(torch.autograd.grad((table * upstream).sum(), logits))
    expected = torch.stack(torch.autograd.grad((want * upstream).sum(), logits))
    # Each layer's projection is shift invariant, so its exact logit gradient
    # sums to 0; the kernel's does to rounding (plain autograd's softmax
    # backward only to ~1e-7 x |upstream| near a one-hot alpha).
    torch.testing.assert_close(got.sum(dim=1), torch.zeros(len(logits)), rtol=0, atol=1e-6)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    slots = torch.arange(model.max_history)
    outside = slots < model.max_history - (num_states + torch.arange(len(logits))).clamp(max=model.max_history)[:, None]
    assert (got[outside] == 0).all()  # slots outside a layer's window get no gradient


def test_other_options_are_projected_in_python_and_collected(kernel):
    model = _stack(depth=3, use_gating=True, prune_threshold=0.01)
    table = _table(kernel, model, 1)
    assert table.grad_fn.name() == "MHCWeightTableBackward"
    assert table.grad_fn.next_functions[0][0].name() != "torch::autograd::AccumulateGrad"
    torch.testing.assert_close(table, model.layer_weights(1))


def test_a_training_step_mixes_from_the_table(kernel):
    model, x = _stack(depth=3), torch.randn(2, 5)
    out = model(x)
    table = out.grad_fn.next_functions[1][0]  # edges: y, the table, the states
    assert out.grad_fn.name() == "MHCMixBackward" and table.name() == "MHCWeightTableBackward"
    assert {fn.name() for fn, _ in table.next_functions} == {"torch::autograd::AccumulateGrad"}


@pytest.mark.parametrize("options", TABLE_CASES[:4])
def test_second_derivatives_through_the_weight_table(kernel, options):
    # create_graph through the logits: the kernel's differentiable backward,
    # against the Python kernel's plain autograd.
    def hessian_vector_product():
        model = _stack(depth=5, **options)
        logits = [s.mixing_logits for s in model.skip_layers]
        loss = model(torch.randn(3, 5, generator=torch.Generator().manual_seed(0))).square().sum()
        grads = torch.autograd.grad(loss, logits, create_graph=True)
        direction = torch.linspace(-1, 1, model.max_history)
        return torch.stack(torch.autograd.grad(sum((g * direction).sum() for g in grads), logits))

    got = hessian_vector_product()
    with _native.python_kernel():
        want = hessian_vector_product()
    scale = want.abs().max().item()
    torch.testing.assert_close(got.sum(dim=1), torch.zeros(len(got)), rtol=0, atol=1e-6 * max(1.0, scale))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=max(1e-6, 1e-2 * scale))
