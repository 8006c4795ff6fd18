"""The GPT of gpt_streams_flax.py in PyTorch, its weights converted from the trained Flax model.

    python examples/gpt_streams_torch.py              # trains the Flax model first (about a minute)
    python examples/gpt_streams_torch.py --smoke      # a few steps of each (MHC_EXAMPLE_SMOKE=1 too)

The same character-level model, module for module: ``nn.Embedding`` for
``nn.Embed``, ``nn.LayerNorm`` for ``LayerNorm(epsilon=1e-5,
use_fast_variance=False)``, ``nn.Linear`` for ``Dense``, exact ``nn.GELU()``
for ``gelu(approximate=False)``, and ``mhc_torch.StreamSequential`` for
``mhc_jax.StreamSequential`` (the same parameter names: ``phi``, ``a_*``,
``b_*``, the sublayer under ``branch``). Attributes carry the Flax module
names, so ``mhc_torch.convert.load_flax`` maps every weight without a table.
The script trains the Flax model (``gpt_streams_flax.main``), loads its
parameters into the torch model, prints how far the two models' logits are
apart on a validation batch, then continues training in torch for a few
steps, with the residual streams' gains from ``mhc_torch.stream_monitor``.
"""

from __future__ import annotations

import argparse
import math
import os
import runpy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import mhc_torch
from mhc_torch.convert import load_flax

FLAX_EXAMPLE = Path(__file__).resolve().with_name("gpt_streams_flax.py")


class CausalSelfAttention(nn.Module):
    """Pre-norm causal self-attention: ``proj(softmax(q k^T / sqrt(d) + mask) v)`` of ``norm(u)``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, u):
        *lead, tokens, width = u.shape
        q, k, v = self.qkv(self.norm(u)).chunk(3, dim=-1)
        # (..., T, heads, d) -> (..., heads, T, d), as scaled_dot_product_attention wants.
        q, k, v = (t.reshape(*lead, tokens, self.heads, -1).transpose(-3, -2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(-3, -2).reshape(*lead, tokens, width))


class MLP(nn.Module):
    """Pre-norm MLP: ``proj(gelu(fc(norm(u))))``, hidden width ``4 C``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)

    def forward(self, u):
        return self.proj(F.gelu(self.fc(self.norm(u))))


class GPT(nn.Module):
    """Token ids ``(B, T)`` to next-character logits ``(B, T, vocab)``."""

    def __init__(self, vocab: int, width: int, heads: int, blocks: int, context: int, streams: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        sublayers = []
        for _ in range(blocks):
            sublayers += [CausalSelfAttention(width, heads), MLP(width)]
        self.blocks = mhc_torch.StreamSequential(sublayers, num_streams=streams, mode="mhc", dim=width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[-1], device=ids.device))
        return self.head(self.norm(self.blocks(x)))


def main(seconds: float = 60.0, steps: int = 200, log_every: int = 50, seed: int = 0, smoke: bool = False,
         flax_result: dict | None = None) -> dict:
    """Train the Flax model for ``seconds`` (or take ``flax_result``, what its
    ``main`` returned), convert, compare, then train ``steps`` steps in torch."""
    flax_example = runpy.run_path(str(FLAX_EXAMPLE))
    if flax_result is None:
        flax_result = flax_example["main"](seconds=seconds, seed=seed, smoke=smoke)
    if smoke:
        steps, log_every = 5, 5
    flax_model, data = flax_result["model"], flax_result["data"]
    config = {name: getattr(flax_model, name) for name in ("vocab", "width", "heads", "blocks", "context", "streams")}
    torch.manual_seed(seed)
    model = GPT(**config)
    load_flax(model, flax_result["params"])  # every weight, by name; raises if one has no counterpart

    # The Flax example's validation windows, and its compiled forward pass.
    val_x, val_y = flax_result["val_x"], flax_result["val_y"]
    flax_logits = np.asarray(flax_result["forward"](flax_result["params"], val_x))
    model.eval()
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(val_x).long()).numpy()
    difference = float(np.abs(torch_logits - flax_logits).max())
    print(f"\nconverted to torch: max |torch - flax| over {torch_logits.size} validation logits = {difference:.1e} "
          f"(logits up to {np.abs(flax_logits).max():.1f})")

    model.train()
    # The Flax example's optimizer: the hyper-connections' own parameters at a tenth of the rate.
    streams = [p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in flax_example["STREAM_PARAMETERS"]]
    rest = [p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] not in flax_example["STREAM_PARAMETERS"]]
    optimizer = torch.optim.AdamW([
        dict(params=rest, lr=flax_example["LEARNING_RATE"], weight_decay=0.01),
        dict(params=streams, lr=flax_example["STREAM_LEARNING_RATE"], weight_decay=0.0),
    ])
    monitor = mhc_torch.stream_monitor(model)
    train = data[: int(0.9 * len(data))]  # the Flax example's split
    stream = flax_example["batches"](train, model.pos.num_embeddings, flax_example["BATCH"], np.random.default_rng(seed + 2))
    losses = []
    for step in range(1, steps + 1):
        x, y = (torch.from_numpy(a).long() for a in next(stream))
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step == 1 or step % log_every == 0:
            metrics = monitor(x)
            print(f"torch step {step:4d}  loss {loss.item():.3f}  composite h_res gain forward "
                  f"{metrics['streams/blocks/composite_forward_gain']:.4f} backward "
                  f"{metrics['streams/blocks/composite_backward_gain']:.4f}")
    model.eval()
    with torch.no_grad():
        val_loss = F.cross_entropy(model(torch.from_numpy(val_x).long()).flatten(0, 1),
                                   torch.from_numpy(val_y).long().flatten()).item()
    print(f"validation loss on {len(val_x)} windows: flax {flax_result['val_loss']:.3f}, torch after {steps} more "
          f"steps {val_loss:.3f} (a uniform guess: {math.log(config['vocab']):.3f})")
    return dict(difference=difference, logit_scale=float(np.abs(flax_logits).max()), losses=losses,
                val_loss=val_loss, flax_result=flax_result)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="Flax training time (default 60)")
    parser.add_argument("--steps", type=int, default=200, help="torch training steps after the conversion")
    parser.add_argument("--smoke", action="store_true", default=bool(os.environ.get("MHC_EXAMPLE_SMOKE")),
                        help="a few steps of each, to check that it runs")
    main(**vars(parser.parse_args()))
