"""Data-parallel scale-out of mhc_jax on 8 simulated CPU devices.

A batch-sharded jitted training step (``jax.sharding.Mesh`` over 8 devices,
the batch axis sharded, the parameters replicated; loss ``mean(out^2)``,
``jax.value_and_grad``, a plain SGD update) of the unrolled and the scanned
``MHCSequential``, and of the unrolled and the scanned (with ``remat``)
``StreamSequential`` (residual streams: docs/streams.md), must

* give the loss, gradients and updated parameters of the unsharded step, and
* compile to a program that all-gathers no activations: each device works on
  its batch shard, and only the gradients and the loss are all-reduced. (A
  custom call XLA cannot partition made it all-gather full-batch activations,
  12 per step.)

XLA fixes its device count when jax starts, so the check runs in a subprocess
started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``: this file,
run as a script, prints its measurements as JSON for the tests to judge.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

DEVICES, DEPTH, WIDTH = 8, 4, 16
#: The global batch: a multiple of DEVICES, and distinct from WIDTH so that an
#: all-gather of activations is told apart from one of a (WIDTH, WIDTH) kernel.
BATCH = 32
LEARNING_RATE = 0.1
NUM_STREAMS = 3  # not BATCH // DEVICES: a per-device (4, 16) shard is told apart from one token's (n, C) streams
VARIANTS = ("unrolled", "scanned", "streams-unrolled", "streams-scanned-remat")


def _measure() -> dict:
    """Run both variants sharded and unsharded; return what the tests judge."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from mhc_jax import MHCSequential, StreamSequential

    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jnp.tanh(nn.Dense(WIDTH)(x))

    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("batch",))
    batch_sharded = NamedSharding(mesh, PartitionSpec("batch"))
    replicated = NamedSharding(mesh, PartitionSpec())
    x = jax.random.normal(jax.random.key(1), (BATCH, WIDTH), jnp.float32)
    report = {"devices": len(devices), "platform": devices[0].platform, "variants": {}}

    def build(variant):
        if variant.startswith("streams"):
            if variant == "streams-scanned-remat":
                return StreamSequential.scanned(Block(), DEPTH, num_streams=NUM_STREAMS, remat=True)
            return StreamSequential([Block()] * DEPTH, num_streams=NUM_STREAMS)
        return MHCSequential([Block()] * DEPTH, max_history=3, use_gating=True, scan=variant == "scanned")

    for variant in VARIANTS:
        model = build(variant)
        params = model.init(jax.random.key(0), x)
        # Away from the near-residual init, so every window state (every
        # stream, every coefficient) matters.
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(2), len(leaves))
        params = jax.tree.unflatten(
            tree, [p + 0.3 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys, strict=True)]
        )

        def step(params, x, model=model):
            loss, grads = jax.value_and_grad(lambda p: jnp.mean(model.apply(p, x) ** 2))(params)
            return loss, grads, jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)

        single = jax.device_put((params, x), devices[0])
        expected = jax.jit(step)(*single)
        sharded = jax.jit(
            step, in_shardings=(replicated, batch_sharded), out_shardings=(replicated, replicated, replicated)
        )
        args = (jax.device_put(params, replicated), jax.device_put(x, batch_sharded))
        got = sharded(*args)
        hlo = sharded.lower(*args).compile().as_text()

        errors = {}
        for what, a, b in zip(("loss", "grads", "params"), got, expected, strict=True):
            pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
            errors[what] = max(
                float(np.max(np.abs(np.asarray(u) - np.asarray(v))) / max(float(np.max(np.abs(np.asarray(v)))), 1e-30))
                for u, v in pairs
            )
        gathers = [line.strip() for line in hlo.splitlines() if re.search(r"\ball-gather(-start)?\(", line)]
        report["variants"][variant] = {
            "relative_errors": errors,
            "all_gathers": gathers,
            "all_reduces": sum(bool(re.search(r"\ball-reduce(-start)?\(", line)) for line in hlo.splitlines()),
            "per_device_batch_in_hlo": bool(re.search(rf"f32\[{BATCH // DEVICES},{WIDTH}\]", hlo)),
        }
    return report


def _result_dims(instruction: str) -> set[int]:
    """The dimensions of an HLO instruction's result shape(s):
    ``%all-gather.5 = f32[32,16]{1,0} all-gather(...)`` gives {32, 16}."""
    match = re.search(r"=\s*(.*?)\s+all-gather(?:-start)?\(", instruction)
    result = match.group(1) if match else ""
    return {int(d) for dims in re.findall(r"\[([\d,]*)\]", result) for d in dims.split(",") if d}


def test_result_dims_reads_the_result_shape_of_an_all_gather():
    line = "%all-gather.5 = f32[32,16]{1,0} all-gather(%param), channel_id=15, dimensions={0}"
    assert _result_dims(line) == {32, 16}
    start = "%ags = (f32[4,16]{1,0}, f32[32,16]{1,0}) all-gather-start(f32[4,16]{1,0} %p), dimensions={0}"
    assert _result_dims(start) == {4, 16, 32}


@pytest.fixture(scope="module")
def report() -> dict:
    env = {
        **os.environ,
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}".strip(),
        "JAX_PLATFORMS": "cpu",
    }
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    try:
        done = subprocess.run(
            [sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True, timeout=600
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the 8-device subprocess did not finish in {err.timeout} s")
    assert done.returncode == 0, f"the 8-device subprocess failed:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_subprocess_sees_eight_cpu_devices(report):
    assert (report["devices"], report["platform"]) == (DEVICES, "cpu")


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_batch_sharded_step_equals_the_unsharded_step(report, variant):
    errors = report["variants"][variant]["relative_errors"]
    assert all(e <= 1e-5 for e in errors.values()), f"relative errors (sharded vs unsharded): {errors}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_batch_sharded_step_all_gathers_no_activations(report, variant):
    measured = report["variants"][variant]
    # Each device holds its shard of the batch, and the gradients are reduced
    # across devices: the step really is data-parallel.
    assert measured["per_device_batch_in_hlo"], "no per-device batch shard in the compiled program"
    assert measured["all_reduces"] > 0, "the gradients are never all-reduced"
    batch_gathers = [g for g in measured["all_gathers"] if BATCH in _result_dims(g)]
    assert not batch_gathers, f"{len(batch_gathers)} all-gathers of the global batch:\n" + "\n".join(batch_gathers)


if __name__ == "__main__":
    print(json.dumps(_measure()))
