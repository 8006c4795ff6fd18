"""Weights between a torch ``state_dict`` and Flax parameters, both ways.

Names. A torch key ``a.b.0.weight`` is matched against the Flax parameter tree
(the *template*, e.g. ``model.init(...)`` or ``jax.eval_shape`` of it):

* ``name.i`` (a ``ModuleList`` entry) is the Flax submodule ``name_i``;
* a bare index ``i`` (an ``nn.Sequential`` child) is Flax's ``layers_i``
  (``flax.linen.Sequential`` names its children so);
* ``wrapped_modules.i`` / ``skip_layers.i`` (``MHCSequential``) are
  ``layers_i`` / ``skip_layers_i``;
* other names are the same in both (name your Flax submodules after the torch
  attributes).

Values, chosen by the Flax leaf's name:

* ``kernel`` <- ``weight``: Linear ``(out, in)`` is transposed to ``(in, out)``;
  Conv ``(out, in, *spatial)`` (OIHW) becomes ``(*spatial, in, out)`` (HWIO);
* ``scale`` (LayerNorm), ``embedding`` (Embed) <- ``weight``, unchanged;
* ``bias``, ``mixing_logits``, ``gate_logit`` unchanged;
* batch norm: ``weight`` is ``scale``, and the buffers ``running_mean`` /
  ``running_var`` are ``mean`` / ``var`` in the ``batch_stats`` collection
  (pass the whole variables, ``{"params": ..., "batch_stats": ...}``, as
  ``model.init`` returns them). ``num_batches_tracked`` has no Flax
  counterpart: it is skipped one way and kept from the torch side the other.

Activations move between NCHW (torch) and NHWC (Flax); this module only moves
weights. To compute what torch computes, build the Flax layers to match:
``LayerNorm(epsilon=1e-5, use_fast_variance=False)`` (torch's epsilon and
two-pass variance), ``gelu(approximate=False)`` for ``nn.GELU()``, and
``Conv(padding=p)`` for ``Conv2d(padding=p)``. Everything here is numpy: torch tensors are read with
``.detach().cpu().numpy()`` and torch itself is not imported. The entry points
that also check the torch module's layer types are in ``mhc_torch.convert``.

A scanned stack (``MHCSequential(scan=True)``) stores its layers stacked along
a leading depth axis: :func:`stack_layer_params` and
:func:`unstack_layer_params` move between that layout and the unrolled one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "ConversionError",
    "torch_to_flax",
    "flax_to_torch",
    "stack_layer_params",
    "unstack_layer_params",
]

#: torch attribute names that the JAX twin spells differently.
_ALIASES = {"wrapped_modules": "layers"}
_PROJECTION = re.compile(r"projection_from_(\d+)")
#: torch batch-norm buffers and their leaves in Flax's ``batch_stats`` collection.
_STATS = {"running_mean": "mean", "running_var": "var"}
#: torch's count of batch-norm updates; Flax keeps none.
_UNTRACKED = "num_batches_tracked"


class ConversionError(KeyError):
    """A parameter that has no counterpart, or whose shape does not fit. The
    message names the key."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _variables_root(params: Mapping) -> tuple[Mapping, bool]:
    """Accept ``{"params": tree}`` (what ``init`` returns) or the tree itself."""
    if set(params) == {"params"}:
        return params["params"], True
    return params, False


def _collections(variables: Mapping) -> tuple[Mapping, Mapping | None, bool]:
    """``(params, batch_stats or None, wrapped)`` of Flax variables: like
    :func:`_variables_root`, also accepting ``{"params": ..., "batch_stats": ...}``."""
    if set(variables) == {"params", "batch_stats"}:
        return variables["params"], variables["batch_stats"], True
    tree, wrapped = _variables_root(variables)
    return tree, None, wrapped


def _stats_path(key: str, stats: Mapping | None, leaf: str) -> tuple[str, ...]:
    """The ``batch_stats`` path of a torch batch-norm buffer ``key``."""
    if stats is None:
        raise ConversionError(
            f"torch buffer {key!r} is a batch-norm running statistic: pass the Flax variables "
            "with their 'batch_stats' collection ({'params': ..., 'batch_stats': ...}, as "
            "model.init returns them)"
        )
    return _flax_path(key, stats, leaf=_STATS[leaf])


def _flax_path(key: str, tree: Mapping, leaf: str | None = None) -> tuple[str, ...]:
    """The Flax path of torch key ``key``, resolved against ``tree`` (``leaf``
    replaces the key's last name, for buffers that Flax names otherwise)."""
    *modules, torch_leaf = key.split(".")
    leaf = leaf or torch_leaf
    node, path, i = tree, [], 0
    while i < len(modules):
        seg = _ALIASES.get(modules[i], modules[i])
        nxt = modules[i + 1] if i + 1 < len(modules) else None
        if nxt is not None and nxt.isdigit() and f"{seg}_{nxt}" in node:
            name, i = f"{seg}_{nxt}", i + 2  # ModuleList entry
        elif seg.isdigit() and f"layers_{seg}" in node:
            name, i = f"layers_{seg}", i + 1  # nn.Sequential child
        elif seg in node and isinstance(node[seg], Mapping):
            name, i = seg, i + 1
        else:
            raise ConversionError(
                f"torch parameter {key!r} has no Flax counterpart: no submodule for "
                f"{'.'.join(modules[: i + 1])!r} under {'/'.join(path) or 'the root'} "
                f"(there: {sorted(node)})"
            )
        node, path = node[name], [*path, name]
    for candidate in ("kernel", "scale", "embedding", "weight") if leaf == "weight" else (leaf,):
        if candidate in node and not isinstance(node[candidate], Mapping):
            return (*path, candidate)
    raise ConversionError(
        f"torch parameter {key!r} has no Flax counterpart: {'/'.join(path)} holds {sorted(node)}"
    )


def _to_flax_value(key: str, value: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 2:
        return value.T  # Linear (out, in) -> Dense (in, out)
    if leaf == "kernel" and value.ndim >= 3:
        return np.transpose(value, (*range(2, value.ndim), 1, 0))  # OI(spatial) -> (spatial)IO
    return value


def _to_torch_value(value: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    if leaf == "kernel" and value.ndim >= 3:
        n = value.ndim
        return np.transpose(value, (n - 1, n - 2, *range(n - 2)))  # (spatial)IO -> OI(spatial)
    return value


def _get(tree: Mapping, path: tuple[str, ...]):
    for name in path:
        tree = tree[name]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _leaves(tree: Mapping, prefix: tuple[str, ...] = ()):
    for name, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaves(value, (*prefix, name))
        else:
            yield (*prefix, name), value


def torch_to_flax(state_dict: Mapping[str, Any], template: Mapping) -> dict:
    """Flax parameters holding the weights of a torch ``state_dict``.

    Args:
      state_dict: torch names to tensors (or arrays).
      template: the Flax parameters of the same model (their structure and
        shapes are used, not their values), with or without the outer
        ``{"params": ...}``.
    Returns:
      A parameter tree shaped like ``template`` (numpy arrays).
    Raises:
      ConversionError: naming the first key that has no counterpart, whose
        shape does not fit, or a Flax parameter the ``state_dict`` lacks.
    """
    tree, stats, wrapped = _collections(template)
    out: dict = {}
    stats_out: dict = {}
    for key, value in state_dict.items():
        leaf = key.rpartition(".")[2]
        if leaf == _UNTRACKED:
            continue
        if leaf in _STATS:
            source, target, path = stats, stats_out, _stats_path(key, stats, leaf)
        else:
            source, target, path = tree, out, _flax_path(key, tree)
        converted = _to_flax_value(key, _numpy(value), path[-1])
        expected = tuple(np.shape(_get(source, path)))
        if converted.shape != expected:
            raise ConversionError(
                f"torch parameter {key!r} of shape {tuple(_numpy(value).shape)} does not fit "
                f"Flax {'/'.join(path)} of shape {expected}"
            )
        _set(target, path, converted)
    for collection, got in ((tree, out), (stats or {}, stats_out)):
        missing = [path for path, _ in _leaves(collection) if not _has(got, path)]
        if missing:
            raise ConversionError(
                f"Flax parameter {'/'.join(missing[0])} has no value in the torch state_dict "
                f"({len(missing)} missing)"
            )
    if stats is not None:
        return {"params": out, "batch_stats": stats_out}
    return {"params": out} if wrapped else out


def _has(tree: Mapping, path: tuple[str, ...]) -> bool:
    try:
        _get(tree, path)
    except KeyError:
        return False
    return True


def flax_to_torch(params: Mapping, state_dict_template: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A torch ``state_dict`` (numpy values) holding Flax parameters.

    Args:
      params: Flax parameters, with or without the outer ``{"params": ...}``.
      state_dict_template: the torch model's ``state_dict()`` (names and
        shapes are used). An ``MHCSkip``'s ``auto_project`` maps are created
        lazily in torch, so they may be absent from it: they are added by name.
    Raises:
      ConversionError: naming the first parameter without a counterpart or
        whose shape does not fit.
    """
    tree, stats, _ = _collections(params)
    out: dict[str, np.ndarray] = {}
    covered: set[tuple[str, ...]] = set()
    covered_stats: set[tuple[str, ...]] = set()
    skip_prefixes: dict[tuple[str, ...], str] = {}
    for key, reference in state_dict_template.items():
        leaf = key.rpartition(".")[2]
        if leaf == _UNTRACKED:
            out[key] = _numpy(reference)
            continue
        if leaf in _STATS:
            source, path = stats, _stats_path(key, stats, leaf)
            covered_stats.add(path)
        else:
            source, path = tree, _flax_path(key, tree)
            covered.add(path)
        value = _to_torch_value(_numpy(_get(source, path)), path[-1])
        expected = tuple(np.shape(_numpy(reference)))
        if value.shape != expected:
            raise ConversionError(
                f"Flax {'/'.join(path)} of shape {tuple(np.shape(_get(source, path)))} does not fit "
                f"torch parameter {key!r} of shape {expected}"
            )
        out[key] = value
        if path[-1] == "mixing_logits":
            skip_prefixes[path[:-1]] = key[: -len("mixing_logits")]
    for path, value in _leaves(tree):
        if path in covered:
            continue
        if len(path) >= 2 and _PROJECTION.fullmatch(path[-2]) and path[-1] == "kernel" and path[:-2] in skip_prefixes:
            out[f"{skip_prefixes[path[:-2]]}{path[-2]}.weight"] = _to_torch_value(_numpy(value), "kernel")
            continue
        raise ConversionError(f"Flax parameter {'/'.join(path)} has no counterpart in the torch state_dict")
    for path, _ in _leaves(stats or {}):
        if path not in covered_stats:
            raise ConversionError(f"Flax batch_stats {'/'.join(path)} has no counterpart in the torch state_dict")
    return out


def _stack(trees: list) -> Any:
    if isinstance(trees[0], Mapping):
        return {name: _stack([t[name] for t in trees]) for name in trees[0]}
    return np.stack([_numpy(t) for t in trees])


def _index(tree: Any, i: int) -> Any:
    if isinstance(tree, Mapping):
        return {name: _index(value, i) for name, value in tree.items()}
    return _numpy(tree)[i]


def _chunking(depth: int, max_history: int) -> tuple[int, int, int]:
    """(chunk size C, scanned chunks, tail layers) of a scanned stack."""
    from .sequential import MAX_CHUNK

    size = min(max_history, depth, MAX_CHUNK)
    return (size, *divmod(depth, size))


def _indexed(tree: Mapping, prefix: str) -> int:
    """How many ``{prefix}_{i}`` entries (i = 0, 1, ...) the tree holds."""
    return sum(1 for name in tree if re.fullmatch(rf"{prefix}_\d+", name))


def stack_layer_params(params: Mapping, max_history: int) -> dict:
    """Unrolled ``MHCSequential`` parameters to the scanned layout.

    With ``C = min(H, L, MAX_CHUNK)``: layer ``c*C + j`` goes to ``blocks/layers_{j}`` at
    index ``c`` of a leading chunk axis, the last ``L mod C`` layers to
    ``tail/layers_{j}``, and ``skip_layers_{i}/...`` to ``skip_layers/...``
    stacked along a leading depth axis. Other entries are kept.
    """
    tree, wrapped = _variables_root(params)
    layers, skips = _indexed(tree, "layers"), _indexed(tree, "skip_layers")
    depth = max(layers, skips)
    if depth == 0:
        raise ConversionError("no layers_{i} or skip_layers_{i} entries: not unrolled MHCSequential parameters")
    out = {k: v for k, v in tree.items() if not re.fullmatch(r"(skip_)?layers_\d+", k)}
    if skips:
        out["skip_layers"] = _stack([tree[f"skip_layers_{i}"] for i in range(depth)])
    if layers:
        size, chunks, tail = _chunking(depth, max_history)
        out["blocks"] = {
            f"layers_{j}": _stack([tree[f"layers_{c * size + j}"] for c in range(chunks)]) for j in range(size)
        }
        if tail:
            out["tail"] = {f"layers_{j}": tree[f"layers_{chunks * size + j}"] for j in range(tail)}
    return {"params": out} if wrapped else out


def unstack_layer_params(params: Mapping, max_history: int) -> dict:
    """Scanned ``MHCSequential`` parameters to the unrolled layout (inverse of
    :func:`stack_layer_params`)."""
    tree, wrapped = _variables_root(params)
    blocks, tail = tree.get("blocks", {}), tree.get("tail", {})
    skip_leaves = [v for _, v in _leaves(tree.get("skip_layers", {}))]
    if blocks:
        chunks = _numpy(next(v for _, v in _leaves(blocks))).shape[0]
        size = _indexed(blocks, "layers")
        depth = chunks * size + _indexed(tail, "layers")
    elif skip_leaves:
        depth, size, chunks = _numpy(skip_leaves[0]).shape[0], 1, 0
    else:
        raise ConversionError("no 'blocks' or 'skip_layers' entries: not scanned MHCSequential parameters")
    out = {k: v for k, v in tree.items() if k not in ("skip_layers", "blocks", "tail")}
    for i in range(depth):
        if skip_leaves:
            out[f"skip_layers_{i}"] = _index(tree["skip_layers"], i)
        if blocks:
            c, j = divmod(i, size)
            out[f"layers_{i}"] = _index(blocks[f"layers_{j}"], c) if c < chunks else tail[f"layers_{i - chunks * size}"]
    return {"params": out} if wrapped else out


# --- residual streams (StreamSequential) ----------------------------------------------------


def stack_stream_params(params: Mapping) -> dict:
    """Unrolled ``StreamSequential`` parameters to the scanned layout.

    ``layers_{i}/...`` (each layer's ``HyperConnection`` and its ``branch``)
    are stacked along a leading depth axis into ``layers/...``, the layout of
    ``StreamSequential(scan=True)``; other entries are kept. A torch
    ``state_dict`` converts to the unrolled layout (:func:`torch_to_flax`),
    then here.
    """
    tree, wrapped = _variables_root(params)
    depth = _indexed(tree, "layers")
    if depth == 0:
        raise ConversionError("no 'layers_{i}' entries: not unrolled StreamSequential parameters")
    out = {k: v for k, v in tree.items() if not re.fullmatch(r"layers_\d+", k)}
    out["layers"] = _stack([tree[f"layers_{i}"] for i in range(depth)])
    return {"params": out} if wrapped else out


def unstack_stream_params(params: Mapping) -> dict:
    """Scanned ``StreamSequential`` parameters to the unrolled layout (inverse of
    :func:`stack_stream_params`)."""
    tree, wrapped = _variables_root(params)
    if "layers" not in tree:
        raise ConversionError("no 'layers' entry: not scanned StreamSequential parameters")
    leaves = [v for _, v in _leaves(tree["layers"])]
    depth = _numpy(leaves[0]).shape[0]
    out = {k: v for k, v in tree.items() if k != "layers"}
    for i in range(depth):
        out[f"layers_{i}"] = _index(tree["layers"], i)
    return {"params": out} if wrapped else out
