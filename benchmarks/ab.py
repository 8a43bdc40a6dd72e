"""`python benchmarks/ab.py --base REV`: this checkout's layer against the one of
commit REV, in one process, interleaved.

The package at REV is exported from git into a temporary folder as
`keras_relattn_base` (its imports renamed), so both versions run in the same
process on the same data and weights, their calls interleaved round by
round (`_bench_common.time_interleaved`): machine noise hits both alike. Prints
each path's median milliseconds and the ratio new / base (1.00: unchanged).

Paths (`--paths`):
- `pooled`, `backward`, `full`: W1-W3 compiled (`jax.jit`, XLA; torch
  eager, or `torch.compile` with `--torch-compile`): the pooled output alone,
  its forward + backward, and the forward returning the logits;
- `eager`: W1-W3 pooled, eagerly (JAX and TensorFlow; torch is eager above);
- `model`: `train_on_batch` of a 2-block `RelativeTransformerLayer` model, W2;
- `long`: one forward + backward of the pooled output at `--long-length`
  tokens (batch 1, per-token positions, trainable table), eagerly;
- `banded`: the same with `sequence_positions=True` (the banded path, edspdf's
  clamped 64-row table);
- `deberta`: the banded path configured as DeBERTa-v3's attention (tied
  projections, log buckets (256, 512) of a 512-row table, no head bias).
  With `--long-compiled`, these three run compiled by XLA (JAX, TensorFlow).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

from _relaunch import on_backend

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def export_base(rev, folder):
    """The package at `rev` as `keras_relattn_base` inside `folder`."""
    archive = subprocess.run(["git", "archive", rev, "keras_relattn"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    os.rename(os.path.join(folder, "keras_relattn"), os.path.join(folder, "keras_relattn_base"))
    for path, _, files in os.walk(os.path.join(folder, "keras_relattn_base")):
        for name in files:
            if name.endswith(".py"):
                file = os.path.join(path, name)
                with open(file) as f:
                    text = f.read()
                text = re.sub(r"\bkeras_relattn\b(?!_demo)", "keras_relattn_base", text)
                with open(file, "w") as f:
                    f.write(text)


def parse(argv):
    p = argparse.ArgumentParser(prog="python benchmarks/ab.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the git commit to compare with")
    p.add_argument("--backend", choices=["tensorflow", "jax", "torch"])
    p.add_argument("--paths", default="pooled,backward,full,eager,model,long,banded,deberta")
    p.add_argument("--workloads", default="W1,W2,W3")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--torch-compile", action="store_true")
    p.add_argument("--long-length", type=int, default=4096)
    p.add_argument("--long-compiled", action="store_true",
                   help="the long paths compiled by XLA (jax.jit, tf.function(jit_compile=True));"
                        " torch stays eager")
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    code = on_backend(args.backend, __file__, argv)
    if code is not None:
        return code
    folder = tempfile.mkdtemp(prefix="relattn_ab_")
    export_base(args.base, folder)
    sys.path.insert(0, folder)
    sys.path.insert(0, HERE)
    import keras
    import numpy as np

    import _bench_common  # noqa: F401  (the helpers use it; loaded before the packages)
    import keras_relattn
    import keras_relattn_base

    packages = {"new": keras_relattn, "base": keras_relattn_base}
    rng = np.random.default_rng(0)
    paths = [p.strip() for p in args.paths.split(",")]
    print(f"keras {keras.__version__}, backend {keras.backend.backend()}; new = this checkout, "
          f"base = {args.base}; medians of {args.repeats} interleaved rounds")
    print(f"{'path':10} {'workload':9} {'new ms':>9} {'base ms':>9} {'new/base':>9}")
    time_layer_paths(args, paths, packages, rng)
    if "model" in paths:
        time_model(args, packages, rng)
    time_long_paths(args, paths, packages, rng)
    return 0


def report(args, path, workload, runners):
    import _bench_common as bench

    medians = bench.time_interleaved(runners, args.repeats)
    print(f"{path:10} {workload:9} {medians['new']:9.2f} {medians['base']:9.2f} "
          f"{medians['new'] / medians['base']:9.2f}", flush=True)


def paired_layers(packages, rng, coords):
    """Each package's layer, built, the same random weights in both."""
    import _bench_common as bench

    made = {}
    for name, package in packages.items():
        made[name] = package.RelativeAttention(
            bench.SIZE, bench.HEADS, position_embedding_shape=(bench.POSITIONS, bench.SIZE),
            n_coordinates=coords, mode=("c2c", "c2p", "p2c"))
        made[name].build()
    weights = [rng.normal(0, 0.1, size=w.shape).astype("float32")
               for w in made["new"].get_weights()]
    for layer in made.values():
        layer.set_weights(weights)
    return made


def time_layer_paths(args, paths, packages, rng):
    """`pooled`, `backward`, `full` (compiled) and `eager`, at each workload."""
    import keras

    import _bench_common as bench

    backend = keras.backend.backend()
    calls = {"pooled": (bench.ours_pooled_call, False), "backward": (bench.ours_pooled_call, True),
             "full": (bench.ours_call, False)}
    for path in paths:
        if path not in calls and path != "eager":
            continue
        if path == "eager" and backend == "torch":
            continue
        for workload in [w.strip() for w in args.workloads.split(",")]:
            spec = bench.WORKLOADS[workload]
            data = bench.make_data(rng, spec["batch"], spec["length"], spec["coords"])
            made = paired_layers(packages, rng, spec["coords"])
            if path == "eager":
                tensors = [keras.ops.convert_to_tensor(a) for a in data]
                runners = {name: (lambda layer=layer: keras.ops.convert_to_numpy(
                    bench.ours_pooled_call(layer, *tensors)[:1, :1]))
                           for name, layer in made.items()}
            else:
                call, backward = calls[path]
                runners = {name: bench.compiled_keras(layer, call, backward, data,
                                                      args.torch_compile)
                           for name, layer in made.items()}
            report(args, path, workload, runners)


def time_model(args, packages, rng):
    """`model`: `train_on_batch` of a 2-block model, W2."""
    import keras

    import _bench_common as bench

    spec = bench.WORKLOADS["W2"]
    x, mask, rel = bench.make_data(rng, spec["batch"], spec["length"], spec["coords"])
    y = rng.normal(size=x.shape).astype("float32")
    models = {}
    for name, package in packages.items():
        inputs = keras.Input((None, bench.SIZE))
        offsets = keras.Input((None, None, 1), dtype="int32")
        h = inputs
        for i in range(2):
            h = package.RelativeTransformerLayer(
                bench.SIZE, bench.HEADS, n_coordinates=1, init_resweight=0.5,
                position_embedding_shape=(bench.POSITIONS, bench.SIZE),
            )(h, relative_positions=offsets, return_logits=False)
        models[name] = keras.Model([inputs, offsets], h)
        models[name].compile(keras.optimizers.SGD(1e-3), "mse")
    models["base"].set_weights(models["new"].get_weights())
    report(args, "model", "W2", {name: (lambda m=m: m.train_on_batch([x, rel], y))
                                 for name, m in models.items()})


def time_long_paths(args, paths, packages, rng):
    """`long`, `banded`, `deberta`: one forward + backward at `--long-length`."""
    import keras
    import numpy as np

    import _bench_common as bench

    backend = keras.backend.backend()
    long_paths = {  # the layer's options, and whether it is given per-token positions
        "long": (dict(position_embedding_shape=(bench.POSITIONS, bench.SIZE)), True),
        "banded": (dict(position_embedding_shape=(bench.POSITIONS, bench.SIZE),
                        sequence_positions=True), False),
        "deberta": (dict(position_embedding_shape=(512, bench.SIZE), sequence_positions=True,
                         tied_position_projections=True, position_buckets=(256, 512),
                         head_bias=False), False),
    }
    for path, (options, per_token) in long_paths.items():
        if path not in paths:
            continue
        n = args.long_length
        x = rng.normal(size=(1, n, bench.SIZE)).astype("float32")
        positions = np.arange(n, dtype="int32")[None, :, None] if per_token else None
        made = {}
        for name, package in packages.items():
            made[name] = package.RelativeAttention(
                bench.SIZE, bench.HEADS, position_embedding_trainable=True, **options)
            made[name].build()
        made["base"].set_weights(made["new"].get_weights())
        compiled = args.long_compiled and backend != "torch"
        runners = {name: _long_step(layer, x, positions, backend, compiled)
                   for name, layer in made.items()}
        medians = bench.time_interleaved(runners, max(2, args.repeats // 3), warmup=1, block=1)
        print(f"{path:10} {n:<9} {medians['new']:9.1f} {medians['base']:9.1f} "
              f"{medians['new'] / medians['base']:9.2f}", flush=True)


def _long_step(layer, x, positions, backend, compiled=False):
    """One forward + backward of the pooled output (gradients of every
    trainable weight and of the input), eager or `compiled` by XLA (JAX,
    TensorFlow); `positions` per token, or None (the layer forms its own)."""
    import keras

    def loss(out):
        return keras.ops.sum(out)

    given = {} if positions is None else {"query_positions": positions}

    if backend == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_variables]
        ntv = [v.value for v in layer.non_trainable_variables]

        def of(x, tv):
            return loss(layer.stateless_call(tv, ntv, x, x, x, return_logits=False, **given)[0])

        grad = jax.grad(of, argnums=(0, 1))
        grad = jax.jit(grad) if compiled else grad
        return lambda: jax.block_until_ready(grad(x, trainable))
    if backend == "tensorflow":
        import tensorflow as tf

        xt = tf.convert_to_tensor(x)

        def run():
            with tf.GradientTape() as tape:
                tape.watch(xt)
                value = loss(layer(xt, xt, xt, return_logits=False, **given))
            return tape.gradient(value, [xt] + [v.value for v in layer.trainable_variables])

        return tf.function(run, jit_compile=True) if compiled else run
    import torch

    xt = torch.tensor(x, requires_grad=True)

    def run():
        xt.grad = None
        loss(layer(xt, xt, xt, return_logits=False, **given)).backward()

    return run


if __name__ == "__main__":
    sys.exit(main())
