"""mhc_jax under hostile use: a History of the wrong size, non-finite logits.

Each test states the behaviour a user is owed (a correct answer or a clear
error naming what is wrong, never a silent wrong one); each failed on the
library before issue 13.
"""

from __future__ import annotations

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mhc_jax import History, MHCSequential, MHCSkip

WIDTH = 8


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(WIDTH)(x))


def _x(batch: int = 4, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, WIDTH))


def _names_both(message: str, slots: int, max_history: int) -> bool:
    numbers = re.findall(r"\d+", message)
    return str(slots) in numbers and str(max_history) in numbers


# --- a History whose slot count differs from max_history -------------------------


@pytest.mark.parametrize("slots", [2, 8])
def test_a_skip_rejects_a_history_of_another_size_naming_both(slots):
    # Before: H=2 silently dropped the residual, H=8 gave NaN.
    skip = MHCSkip(max_history=4)
    x = _x()
    wrong = History.create(x, slots).push(x + 1)
    with pytest.raises(ValueError) as err:
        skip.init(jax.random.key(0), x, wrong)
    assert _names_both(str(err.value), slots, 4), str(err.value)
    params = skip.init(jax.random.key(0), x, History.create(x, 4))
    with pytest.raises(ValueError) as err:
        skip.apply(params, x, wrong)
    assert _names_both(str(err.value), slots, 4), str(err.value)
    with pytest.raises(ValueError) as err:  # a static shape: caught under jit as well
        jax.jit(skip.apply)(params, x, wrong)
    assert _names_both(str(err.value), slots, 4), str(err.value)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("slots", [2, 8])
def test_a_stack_rejects_a_carried_history_of_another_size_naming_both(slots, scan):
    model = MHCSequential([Block()] * 3, max_history=4, scan=scan)
    x = _x()
    params = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError) as err:
        model.apply(params, x, history=History.create(x, slots))
    assert _names_both(str(err.value), slots, 4), str(err.value)


# --- non-finite logits --------------------------------------------------------------

BAD_LOGITS = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}


def _poison(params, layer: int, value: float):
    """``params`` with the latest-slot logit of skip ``layer`` set to ``value``,
    whichever layout holds the logits (one array per skip, or stacked by depth)."""
    flat = traverse_util.flatten_dict(params)
    keys = [k for k in flat if k[-1] == "mixing_logits"]
    if len(keys) == 1 and flat[keys[0]].ndim == 2:  # (L, H), one row per layer
        flat[keys[0]] = flat[keys[0]].at[layer, -1].set(value)
    else:
        (key,) = [k for k in keys if f"skip_layers_{layer}" in k]
        flat[key] = flat[key].at[-1].set(value)
    return traverse_util.unflatten_dict(flat)


#: (options, bad logit): every bad value in the default mode, NaN in the others
#: (each case compiles; the torch twin runs the full product).
NON_FINITE_CASES = [
    *(pytest.param(dict(mode="mhc"), v, id=f"mhc-{k}") for k, v in BAD_LOGITS.items()),
    pytest.param(dict(mode="hc"), math.nan, id="hc-nan"),
    pytest.param(dict(mode="hc"), -math.inf, id="hc--inf"),
    pytest.param(dict(mode="mhc", constraint="identity", use_gating=True), math.nan, id="mhc-identity-gated-nan"),
]


@pytest.mark.parametrize("options, bad", NON_FINITE_CASES)
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_a_non_finite_logit_makes_the_stack_output_nan(options, bad, scan):
    # Never the residual alone (a skip that silently disappears), in both packages.
    model = MHCSequential([Block()] * 3, max_history=3, scan=scan, **options)
    x = _x()
    params = _poison(model.init(jax.random.key(0), x), 1, bad)
    out = np.asarray(jax.jit(model.apply)(params, x))
    assert np.isnan(out).all(), f"a {bad} logit gave {out}"
    skip = MHCSkip(max_history=3, **options)
    skip_params = skip.init(jax.random.key(0), x, [x] * 3)
    logits = skip_params["params"]["mixing_logits"].at[-1].set(bad)
    skip_params = {"params": {**skip_params["params"], "mixing_logits": logits}}
    single = np.asarray(skip.apply(skip_params, x, [x] * 3))
    assert np.isnan(single).all(), "the skip called on its own hides the bad logit"
