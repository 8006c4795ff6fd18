"""A custom, non-sequential model made a first-class citizen with @mhc_compatible.

    python examples/custom_layer.py

``MySuperLayer`` is the custom-layers document's layer: a transformation plus
an MHCSkip, mixing the history its container passes down. ``TwoBranchNet``
runs two such layers side by side over one shared HistoryBuffer that it
manages itself ("the governor" of its buffer). Both are decorated, so:

* ``clear_history()`` reaches the buffer wherever it is kept;
* moving the model (``.double()``, ``.to(device)``) moves the stored states;
* ``extract_mixing_weights`` (and ``MHCLightningCallback``) find the layers;
* ``inject_mhc`` leaves them alone.
"""

from __future__ import annotations

import torch
from torch import nn

from mhc_torch import HistoryBuffer, MHCSkip, diagnose, extract_mixing_weights, inject_mhc, mhc_compatible


@mhc_compatible
class MySuperLayer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.skip = MHCSkip(max_history=4)  # 1. the mixing engine
        self.layer = nn.Linear(dim, dim)

    def forward(self, x, history=None):
        x = self.layer(x)  # 2. the transformation
        return self.skip(x, history or [])  # 3. the mHC mix (history passed down by the container)


@mhc_compatible
class TwoBranchNet(nn.Module):
    """Two branches over one window; the model decides what is remembered."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.left, self.right = MySuperLayer(dim), MySuperLayer(dim)
        self.merge = nn.Linear(2 * dim, dim)
        self.windows = [HistoryBuffer(max_history=4)]  # held in a plain list: still found and moved

    def forward(self, x):
        window = self.windows[0]
        window.append(x)
        left = self.left(x, window.get())
        right = self.right(torch.tanh(x), window.get())
        window.append(left)  # remember only the left branch
        return self.merge(torch.cat([left, right], dim=-1))


def main() -> dict:
    torch.manual_seed(0)
    model = TwoBranchNet()
    x = torch.randn(8, 16)
    model(x)
    model(x)  # a second call sees the first one's states...
    window = len(model.windows[0])
    model.clear_history()  # ...until the history is cleared
    print(f"window after two calls: {window} states; after clear_history(): {len(model.windows[0])}")

    for _ in range(3):  # three steps of one sequence: the window fills up
        x = model(x)
    model.double()
    moved = model.windows[0].get()[0].dtype
    print(f"after .double(), the stored states are {moved}")

    weights = extract_mixing_weights(model)
    print("mixing weights found:", {name: w.round(3).tolist() for name, w in weights.items()})
    for warning in diagnose(weights):
        print("diagnosis:", warning.kind, "-", warning.message.split(":")[0])

    wrapper = nn.Sequential(nn.Linear(16, 16), model.float())
    inject_mhc(wrapper, nn.Linear)
    untouched = type(wrapper[1].left.layer) is nn.Linear and type(wrapper[1].merge) is nn.Linear
    print(f"inject_mhc wrapped {type(wrapper[0]).__name__} and left the decorated model untouched: {untouched}")
    return dict(window=window, moved=moved, weights=weights, untouched=untouched)


if __name__ == "__main__":
    main()
