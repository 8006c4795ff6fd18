"""Both packages' monitoring agrees: the same weights from the same model, the
same diagnosis and metrics for the same weights."""

from __future__ import annotations

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import mhc_jax
import mhc_torch
from mhc_torch.convert import to_flax


@st.composite
def weight_dicts(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    out = {}
    for i in range(draw(st.integers(1, 6))):
        k = draw(st.integers(0, 5))
        kind = draw(st.sampled_from(["random", "uniform", "pinned", "copy", "nan"]))
        if kind == "uniform" and k:
            w = np.full(k, 1 / k)
        elif kind == "pinned" and k:
            w = np.r_[np.full(k - 1, 0.002 / max(k - 1, 1)), 0.998][-k:]
        elif kind == "copy" and out:
            w = next(iter(out.values())).copy()
        elif kind == "nan" and k:
            w = np.full(k, np.nan)
        else:
            w = rng.dirichlet(np.ones(k)) if k else np.zeros(0)
        out[f"layer{i}"] = w.astype(np.float32)
    return out


@given(weights=weight_dicts())
def test_both_packages_give_the_same_diagnosis(weights):
    a = mhc_jax.diagnose(weights)
    b = mhc_torch.diagnose(weights)
    assert [(w.kind, w.layers, w.message) for w in a] == [(w.kind, w.layers, w.message) for w in b]
    np.testing.assert_equal(mhc_jax.mixing_metrics(weights), mhc_torch.mixing_metrics(weights))


def test_torch_and_jax_extract_the_same_weights_from_the_same_model():
    torch.manual_seed(0)
    options = dict(max_history=3, mode="mhc", constraint="identity", temperature=0.7, epsilon=0.2)
    tmodel = mhc_torch.MHCSequential([nn.Linear(4, 4) for _ in range(5)], **options)
    with torch.no_grad():
        for skip in tmodel.skip_layers:
            skip.mixing_logits.normal_()
    tmodel(torch.randn(2, 4))  # the skips record the windows they mixed
    fmodel = mhc_jax.MHCSequential([fnn.Dense(4) for _ in range(5)], **options)
    params = to_flax(tmodel, fmodel.init(jax.random.key(0), jnp.ones((2, 4))))
    from_torch = mhc_torch.extract_mixing_weights(tmodel)
    from_jax = mhc_jax.extract_mixing_weights(params, fmodel)
    from_scanned = mhc_jax.extract_mixing_weights(mhc_jax.convert.stack_layer_params(params, 3), fmodel)
    assert list(from_jax) == list(from_scanned) == [f"skip_layers_{i}" for i in range(5)]
    for i in range(5):
        np.testing.assert_allclose(from_jax[f"skip_layers_{i}"], from_torch[f"skip_layers.{i}"], atol=1e-6)
        np.testing.assert_allclose(from_scanned[f"skip_layers_{i}"], from_torch[f"skip_layers.{i}"], atol=1e-6)
    assert [len(w) for w in from_jax.values()] == [1, 2, 3, 3, 3]
    # The skip's own projection, with its exact floor on the latest state.
    assert all(w[-1] >= 0.2 - 1e-6 for w in from_jax.values())


def test_both_packages_report_the_same_diverged_skips():
    # The same model, logits diverged in two skips (a NaN inside layer 3's window,
    # an inf outside layer 1's), read by both packages: the same NaN weights,
    # the same diagnosis, the same metrics, no exception.
    torch.manual_seed(0)
    options = dict(max_history=3, mode="mhc", constraint="simplex", temperature=0.7)
    tmodel = mhc_torch.MHCSequential([nn.Linear(4, 4) for _ in range(5)], **options)
    tmodel(torch.randn(2, 4))
    with torch.no_grad():
        tmodel.skip_layers[3].mixing_logits[2] = float("nan")
        tmodel.skip_layers[1].mixing_logits[0] = float("inf")
    fmodel = mhc_jax.MHCSequential([fnn.Dense(4) for _ in range(5)], **options)
    params = to_flax(tmodel, fmodel.init(jax.random.key(0), jnp.ones((2, 4))))
    from_torch = {k.replace(".", "_"): w for k, w in mhc_torch.extract_mixing_weights(tmodel).items()}
    from_jax = mhc_jax.extract_mixing_weights(params, fmodel)
    assert list(from_jax) == list(from_torch)
    for name, w in from_jax.items():
        np.testing.assert_array_equal(np.isnan(w), np.isnan(from_torch[name]), err_msg=name)
        np.testing.assert_allclose(w, from_torch[name], atol=1e-6, equal_nan=True)
    assert [n for n, w in from_jax.items() if np.isnan(w).any()] == ["skip_layers_1", "skip_layers_3"]
    a, b = mhc_jax.diagnose(from_jax), mhc_torch.diagnose(from_torch)
    assert [(w.kind, w.layers, w.message) for w in a] == [(w.kind, w.layers, w.message) for w in b]
    assert ("non_finite", ("skip_layers_1", "skip_layers_3")) in [(w.kind, w.layers) for w in a]
    np.testing.assert_equal(mhc_jax.mixing_metrics(from_jax), mhc_torch.mixing_metrics(from_torch))
