"""Weights between a torch model and Flax parameters, both ways (torch side).

These entry points check that every torch layer holding weights is one whose
layout they know, then map names and values with :mod:`mhc_jax.convert` (see
its docstring for the naming rules). They need jax installed; ``import
mhc_torch`` alone does not.

    params = to_flax(torch_model, flax_model.init(key, x))   # torch -> Flax
    load_flax(torch_model, params)                            # Flax -> torch
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mhc_jax.convert import ConversionError, flax_to_torch, torch_to_flax

from .matrix_skip import MatrixMHCSkip
from .skip import MHCSkip
from .streams import HyperConnection

__all__ = ["ConversionError", "SUPPORTED_LAYERS", "check_convertible", "to_flax", "load_flax"]

#: Layers whose weights convert (their Flax twins: Dense, Conv, LayerNorm, Embed).
#: Layers without weights (activations, dropout, pooling, ...) need no entry.
#: A HyperConnection's own parameters (phi, a_*, b_*) keep their names and
#: layout in Flax; its branch converts like any other layer. A MatrixMHCSkip's
#: (H, H) mixing_logits keep theirs too.
SUPPORTED_LAYERS = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LayerNorm, nn.Embedding, MHCSkip, MatrixMHCSkip, HyperConnection
)
#: Batch norms: weight/bias are Flax's scale/bias, running_mean/running_var its
#: batch_stats mean/var (pass the whole Flax variables, not params alone).
SUPPORTED_LAYERS += (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def check_convertible(model: nn.Module) -> None:
    """Raise ``ConversionError`` naming the first layer whose weights cannot convert."""
    for name, module in model.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)]
        own += [n for n, _ in module.named_buffers(recurse=False)]
        if own and not isinstance(module, SUPPORTED_LAYERS):
            raise ConversionError(
                f"cannot convert {name or 'the model'} ({type(module).__name__}, holding "
                f"{', '.join(f'{name}.{n}' if name else n for n in own)}): supported layers with "
                f"weights are {', '.join(t.__name__ for t in SUPPORTED_LAYERS)}"
            )


def to_flax(model: nn.Module, template: Mapping) -> dict:
    """Flax parameters (numpy) holding ``model``'s weights.

    ``template`` is the Flax model's parameters (structure and shapes), e.g.
    ``flax_model.init(key, x)``; with batch norms, the whole variables
    (``params`` and ``batch_stats``), and so is the result.
    """
    check_convertible(model)
    return torch_to_flax(model.state_dict(), template)


@torch.no_grad()
def load_flax(model: nn.Module, params: Mapping) -> nn.Module:
    """Load Flax parameters into ``model`` (in place, strictly) and return it.

    Values keep each torch parameter's device and dtype.
    """
    check_convertible(model)
    state = flax_to_torch(params, model.state_dict())
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()}, strict=True)
    return model
