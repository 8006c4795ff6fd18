"""A small GPT on four residual streams (DeepSeek mHC), trained with Flax + optax under jit.

    python examples/gpt_streams_flax.py               # a minute of training (after compiling)
    python examples/gpt_streams_flax.py --smoke       # a few steps (MHC_EXAMPLE_SMOKE=1 too)

A character-level language model of Python source: a token and a position
embedding, four pre-norm blocks of causal self-attention and MLP sublayers,
a final norm and a linear head. Every sublayer is a branch of
``mhc_jax.StreamSequential(num_streams=4, mode="mhc")``: the residual stream
is widened to four streams, each sublayer reads a learned mix of them and the
streams are mixed by a doubly stochastic ``h_res`` (docs/streams.md). The
text is a module of the Python standard library, read from its file, so the
example needs no download. Every hundred steps the loop prints the
training loss and the stack's composite ``h_res`` gain, computed inside a
jitted function by ``mhc_jax.stream_monitor``; at the end the validation
loss, the stream diagnosis and a sample of generated text.

What the gains show: Sinkhorn's last sweep normalises the rows, so the
forward gain (largest row sum) of every ``h_res``, and of their product,
stays 1; the columns carry the truncation, so the backward gain drifts from
1 by the compounded Sinkhorn residual.

The hyper-connections' own parameters (``phi``, ``a_*``, ``b_*``) learn at a
tenth of the rate of the rest. ``phi`` starts at scale ``1/sqrt(n C)`` (0.06
here) and Adam moves every weight by about the learning rate per step: at
3e-3 the ``h_res`` logits sharpen towards a permutation within a few hundred
steps (in one run of this script, the Sinkhorn residual reached 0.5 and the
backward gain 1.5 by step 400, and ``mhc_jax.diagnose`` said so); at 3e-4
they stay at 1e-4 and 1.0001 while the loss falls as fast.

``examples/gpt_streams_torch.py`` converts the trained weights to the same
model in PyTorch.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mhc_jax

#: The model's sizes; the smoke run uses a smaller one (it compiles faster).
CONFIG = dict(width=64, heads=4, blocks=4, context=64, streams=4)
SMOKE_CONFIG = dict(width=32, heads=2, blocks=1, context=16, streams=4)
BATCH, LEARNING_RATE = 32, 3e-3
#: The hyper-connections' own parameters learn slower (see the module docstring).
STREAM_PARAMETERS, STREAM_LEARNING_RATE = ("phi", "a_pre", "a_post", "a_res", "b_pre", "b_post", "b_res"), 3e-4


def load_text() -> tuple[str, list[str]]:
    """The Python standard library's ``argparse.py`` and its sorted characters (the vocabulary)."""
    text = Path(argparse.__file__).read_text(encoding="utf-8")
    return text, sorted(set(text))


class CausalSelfAttention(nn.Module):
    """Pre-norm causal self-attention: ``proj(softmax(q k^T / sqrt(d) + mask) v)`` of ``norm(u)``."""

    width: int
    heads: int

    @nn.compact
    def __call__(self, u):
        # torch's LayerNorm: epsilon 1e-5 and the two-pass variance.
        h = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="norm")(u)
        q, k, v = jnp.split(nn.Dense(3 * self.width, name="qkv")(h), 3, axis=-1)
        *lead, tokens, _ = u.shape
        q, k, v = (t.reshape(*lead, tokens, self.heads, -1) for t in (q, k, v))
        scores = jnp.einsum("...qhd,...khd->...hqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
        causal = jnp.broadcast_to(jnp.tril(jnp.ones((tokens, tokens), bool)), scores.shape)
        weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
        out = jnp.einsum("...hqk,...khd->...qhd", weights, v).reshape(*lead, tokens, self.width)
        return nn.Dense(self.width, name="proj")(out)


class MLP(nn.Module):
    """Pre-norm MLP: ``proj(gelu(fc(norm(u))))``, hidden width ``4 C``."""

    width: int

    @nn.compact
    def __call__(self, u):
        h = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="norm")(u)
        return nn.Dense(self.width, name="proj")(jax.nn.gelu(nn.Dense(4 * self.width, name="fc")(h), approximate=False))


class GPT(nn.Module):
    """Token ids ``(B, T)`` to next-character logits ``(B, T, vocab)``."""

    vocab: int
    width: int
    heads: int
    blocks: int
    context: int
    streams: int

    @nn.compact
    def __call__(self, ids):
        tokens = nn.Embed(self.vocab, self.width, name="tok")(ids)
        positions = nn.Embed(self.context, self.width, name="pos")(jnp.arange(ids.shape[-1]))
        x = tokens + jnp.broadcast_to(positions, tokens.shape)
        sublayers = []
        for _ in range(self.blocks):
            sublayers += [CausalSelfAttention(self.width, self.heads), MLP(self.width)]
        x = mhc_jax.StreamSequential(sublayers, num_streams=self.streams, mode="mhc", name="blocks")(x)
        # The stack returns the sum of the streams, n times a plain residual
        # stream at init (docs/streams.md): the final norm takes the scale out.
        x = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="norm")(x)
        return nn.Dense(self.vocab, name="head")(x)


def batches(data: np.ndarray, context: int, batch: int, rng: np.random.Generator):
    """Random windows of ``context + 1`` characters: inputs and next-character targets."""
    while True:
        start = rng.integers(0, len(data) - context - 1, batch)
        window = data[start[:, None] + np.arange(context + 1)]
        yield window[:, :-1], window[:, 1:]


def sample(model: GPT, params, prompt: np.ndarray, length: int, key: jax.Array, temperature: float = 0.8) -> np.ndarray:
    """``length`` characters after ``prompt``, one forward pass each over the last ``context``."""
    step = jax.jit(lambda p, ids: model.apply(p, ids)[:, -1])
    ids = list(prompt[-model.context :])
    for key in jax.random.split(key, length):
        logits = step(params, jnp.asarray(ids[-model.context :])[None])
        ids.append(int(jax.random.categorical(key, logits[0] / temperature)))
    return np.asarray(ids[len(prompt[-model.context :]) :])


def main(seconds: float = 60.0, steps: int | None = None, log_every: int = 100, seed: int = 0, smoke: bool = False) -> dict:
    """Train for ``seconds`` after compiling (or exactly ``steps`` steps);
    ``smoke``: 5 steps of a smaller model, no sample."""
    if smoke:
        steps, log_every = 5, 5
    text, vocab = load_text()
    index = {c: i for i, c in enumerate(vocab)}
    data = np.array([index[c] for c in text], np.int32)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    model = GPT(len(vocab), **(SMOKE_CONFIG if smoke else CONFIG))
    stream = batches(train, model.context, BATCH, np.random.default_rng(seed))
    x0, _ = next(stream)
    params = jax.jit(model.init)(jax.random.key(seed), x0)  # compiled: far faster than op by op
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "streams" if path[-1].key in STREAM_PARAMETERS else "rest", params
    )
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.multi_transform({
        "rest": optax.adamw(LEARNING_RATE, weight_decay=0.01),
        "streams": optax.adam(STREAM_LEARNING_RATE),
    }, labels))
    opt_state = optimizer.init(params)

    def loss_fn(params, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), y).mean()

    @jax.jit
    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    forward = jax.jit(model.apply)
    # The residual streams' health from inside jit: the composite gain of the
    # stack's h_res (1 for doubly stochastic mixing) and the Sinkhorn residual.
    monitor = jax.jit(mhc_jax.stream_monitor(model))

    print(f"{len(text)} characters of {Path(argparse.__file__).name}, vocabulary {len(vocab)}; "
          f"{sum(p.size for p in jax.tree_util.tree_leaves(params))} parameters, "
          f"{2 * model.blocks} sublayers on {model.streams} streams")
    history, start, step = [], time.perf_counter(), 0
    while (step < steps) if steps is not None else (time.perf_counter() - start < seconds):
        x, y = next(stream)
        params, opt_state, loss = train_step(params, opt_state, x, y)
        loss.block_until_ready()  # the clock measures finished steps, not queued ones
        step += 1
        if step == 1:  # the clock starts once the step is compiled
            print(f"compiled the training step in {time.perf_counter() - start:.0f} s")
            start = time.perf_counter()
        if step == 1 or step % log_every == 0:
            metrics = {k: float(v) for k, v in monitor(params, x).items()}
            history.append(dict(step=step, loss=float(loss), **metrics))
            print(f"step {step:5d}  loss {float(loss):.3f}  composite h_res gain forward "
                  f"{metrics['streams/blocks/composite_forward_gain']:.4f} backward "
                  f"{metrics['streams/blocks/composite_backward_gain']:.4f}  "
                  f"Sinkhorn residual {metrics['streams/blocks/max_sinkhorn_residual']:.1e}  "
                  f"({time.perf_counter() - start:.0f} s)")
    val_x, val_y = next(batches(val, model.context, 256, np.random.default_rng(seed + 1)))
    val_loss = float(optax.softmax_cross_entropy_with_integer_labels(forward(params, val_x), val_y).mean())
    warnings = mhc_jax.diagnose({}, model=model, variables=params, inputs=jnp.asarray(val_x[:8]))
    final = {k: float(v) for k, v in monitor(params, x).items()}
    print(f"after {step} steps: training loss {history[0]['loss']:.3f} -> {float(loss):.3f}, "
          f"validation loss {val_loss:.3f}, composite h_res gain backward "
          f"{final['streams/blocks/composite_backward_gain']:.4f}; "
          f"stream warnings: {[str(w) for w in warnings] or 'none'}")
    if not smoke:
        generated = sample(model, params, val_x[0], 200, jax.random.key(seed))
        print("sample:\n" + "".join(vocab[i] for i in val_x[0]) + "|" + "".join(vocab[i] for i in generated))
    return dict(model=model, params=params, forward=forward, vocab=vocab, data=data, val_x=val_x, val_y=val_y,
                history=history, final_loss=float(loss), val_loss=val_loss, steps=step, warnings=warnings)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="training time (default 60)")
    parser.add_argument("--steps", type=int, default=None, help="train exactly this many steps instead")
    parser.add_argument("--smoke", action="store_true", default=bool(os.environ.get("MHC_EXAMPLE_SMOKE")),
                        help="a few steps, to check that it runs")
    main(**vars(parser.parse_args()))
