"""The gradient of the table scores, measured three ways (issue 10, item 4).

The position terms gather one score per (query, key) from per-row table
scores `(batch, heads, rows, n_positions)`; the gradient of those scores is a
per-row histogram of the logits' gradient over table positions. Autodiff
computes it as a scatter-add. The alternatives the issue names:

- a one-hot matmul over the `n_positions` axis (`custom_gradient`);
- a segment sum / `index_add` over flat (row, position) numbers.

Usage: python benchmarks/table_gradient.py --backend jax|torch
Prints the median time of each gradient and its ratio to autodiff's, at the
benchmark's W3 term size (batch 8, 256 x 256, 64 positions, 4 heads), and
checks that all three agree.
"""

import argparse
import os
import time

import numpy as np

BATCH, LENGTH, POSITIONS, HEADS = 8, 256, 64, 4


def median_ms(fn, repeats=15):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def jax_gradients(scores, index, upstream):
    import jax
    import jax.numpy as jnp

    def gather(s, i):  # (b, h, q, P) -> (b, h, q, k)
        return jnp.take_along_axis(s, i[:, None], axis=3)

    @jax.custom_vjp
    def gather_one_hot(s, i):
        return gather(s, i)

    gather_one_hot.defvjp(
        lambda s, i: (gather(s, i), i),
        lambda i, g: (jnp.einsum("bqkp,bhqk->bhqp", jax.nn.one_hot(i, POSITIONS, dtype=g.dtype), g), None),
    )

    def segment(s, i, g):
        rows = jnp.arange(BATCH * HEADS * LENGTH).reshape(BATCH, HEADS, LENGTH, 1)
        flat = (rows * POSITIONS + i[:, None]).reshape(-1)
        total = jax.ops.segment_sum(g.reshape(-1), flat, BATCH * HEADS * LENGTH * POSITIONS)
        return total.reshape(s.shape)

    def grad_of(f):
        step = jax.jit(jax.grad(lambda s, i, g: jnp.sum(f(s, i) * g)))
        return lambda: step(scores, index, upstream).block_until_ready()

    segment_step = jax.jit(segment)
    return {
        "autodiff (scatter-add)": grad_of(gather),
        "one-hot matmul (custom_vjp)": grad_of(gather_one_hot),
        "segment_sum": lambda: segment_step(scores, index, upstream).block_until_ready(),
    }


def torch_gradients(scores, index, upstream):
    import torch

    scores = scores.clone().requires_grad_(True)
    expanded = index[:, None].expand(BATCH, HEADS, LENGTH, LENGTH)

    def autodiff():
        scores.grad = None
        torch.gather(scores, 3, expanded).backward(upstream)
        return scores.grad

    def one_hot():
        hot = torch.nn.functional.one_hot(index, POSITIONS).to(upstream.dtype)
        return torch.einsum("bqkp,bhqk->bhqp", hot, upstream)

    def index_add():
        rows = torch.arange(BATCH * HEADS * LENGTH).view(BATCH, HEADS, LENGTH, 1)
        flat = (rows * POSITIONS + expanded).reshape(-1)
        total = torch.zeros(BATCH * HEADS * LENGTH * POSITIONS)
        return total.index_add_(0, flat, upstream.reshape(-1)).view(scores.shape)

    return {"autodiff (scatter-add)": autodiff, "one-hot matmul": one_hot, "index_add": index_add}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("jax", "torch"), default="jax")
    args = parser.parse_args()
    os.environ.setdefault("KERAS_BACKEND", args.backend)
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(BATCH, HEADS, LENGTH, POSITIONS)).astype("float32")
    index = rng.integers(0, POSITIONS, size=(BATCH, LENGTH, LENGTH)).astype("int64")
    upstream = rng.normal(size=(BATCH, HEADS, LENGTH, LENGTH)).astype("float32")
    if args.backend == "jax":
        import jax.numpy as jnp

        ways = jax_gradients(jnp.asarray(scores), jnp.asarray(index, jnp.int32), jnp.asarray(upstream))
    else:
        import torch

        ways = torch_gradients(torch.from_numpy(scores), torch.from_numpy(index),
                               torch.from_numpy(upstream))
    results = {name: np.asarray(fn()).reshape(scores.shape) for name, fn in ways.items()}
    reference = results["autodiff (scatter-add)"]
    for name, value in results.items():
        assert np.allclose(value, reference, atol=1e-3), f"{name} disagrees with autodiff"
    times = {name: median_ms(fn) for name, fn in ways.items()}
    base = times["autodiff (scatter-add)"]
    print(f"{args.backend}: gradient of one term's table scores, W3 size "
          f"({BATCH} x {LENGTH} x {LENGTH}, {POSITIONS} positions, {HEADS} heads)")
    for name, ms in times.items():
        print(f"  {name:30s} {ms:8.1f} ms  {ms / base:6.1f}x autodiff")


if __name__ == "__main__":
    main()
