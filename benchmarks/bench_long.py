"""`python benchmarks/bench_long.py`: long inputs, long training.

Peak memory and time of one pooled-only eager call at long lengths (with
`--backward`: one forward + backward; `--long-compiled`: compiled by XLA, its
first call), each point in its own process, for the systems of
`--long-systems`. `python benchmarks/bench.py --long` runs the same.
"""

import sys

if __name__ == "__main__":  # the command line first: --backend re-runs it before keras loads
    from bench import main

    sys.exit(main(sys.argv[1:], measure="long", script=__file__, doc=__doc__))

import json
import time

import keras
import numpy as np

from _bench_common import BACKEND, HEADS, HERE, POSITIONS, SIZE
from bench_peers import DEBERTA_MODELS
from keras_relattn.relative_attention import RelativeAttention


# --long: peak memory and time of a pooled-only eager call at long lengths ----------

LONG_SYSTEMS = ("ours", "ours_tokens", "keras_mha", "box_transformer")


def _rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def _long_inputs(system, length):
    """The inputs of one --long call, made inside the measured window (the
    positions a user must build count): `ours` takes `(1, n, n, 1)` offsets,
    `ours_tokens` `(1, n, 1)` per-token positions, MHA none."""
    from keras_relattn import positions

    rng = np.random.default_rng(0)
    x = keras.ops.convert_to_tensor(rng.normal(size=(1, length, SIZE)).astype("float32"))
    mask = keras.ops.ones((1, length), "bool")
    if system == "ours":
        return x, mask, positions.sequence_relative_positions(length)
    if system == "ours_tokens":
        return x, mask, positions.sequence_positions(length)
    if system in DEBERTA_MODELS:  # DeBERTa-v3's width of the small model: 64
        x = keras.ops.convert_to_tensor(rng.normal(size=(1, length, 64)).astype("float32"))
        return x, mask
    if system == "box_transformer":  # one page of `length` lines, 40 to a column
        line = np.arange(length)
        x0 = (line // 40 % 4 * 0.25 + 0.01).astype("float32")[None]
        y0 = (line % 40 * 0.024 + 0.02).astype("float32")[None]
        width, height = np.full_like(x0, 0.2), np.full_like(x0, 0.02)
        boxes = dict(xmin=x0, ymin=y0, xmax=x0 + width, ymax=y0 + height, width=width,
                     height=height)
        return x, mask, {k: keras.ops.convert_to_tensor(v) for k, v in boxes.items()}
    return x, mask


def _long_call(system, backward):
    """`(layer, arguments)`: `arguments(x, mask[, positions])` gives the
    layer's `(args, kwargs)` for the pooled output alone. In training the
    table trains, as `BoxTransformer` trains its shared one."""
    if system == "keras_mha":
        layer = keras.layers.MultiHeadAttention(HEADS, SIZE // HEADS)
        return layer, lambda x, mask: ((x, x), dict(attention_mask=mask[:, None, :]))
    if system == "box_transformer":  # one layer; its shared table always trains
        from keras_relattn import BoxTransformer

        layer = BoxTransformer(SIZE, num_heads=HEADS, n_relative_positions=POSITIONS,
                               n_layers=1)
        return layer, lambda x, mask, boxes: ((x, boxes), dict(mask=mask))
    if system in DEBERTA_MODELS:
        layer = DEBERTA_MODELS[system]()
        return layer, lambda x, mask: ((x, mask), {})
    if system == "ours_sequence":  # token indices formed inside: the banded path
        layer = RelativeAttention(SIZE, HEADS, position_embedding_shape=(POSITIONS, SIZE),
                                  position_embedding_trainable=backward, sequence_positions=True)
        return layer, lambda x, mask: ((x, x, x), dict(mask=mask, return_logits=False))
    layer = RelativeAttention(SIZE, HEADS, position_embedding_shape=(POSITIONS, SIZE),
                              position_embedding_trainable=backward)
    name = "relative_positions" if system == "ours" else "query_positions"
    return layer, lambda x, mask, pos: (
        (x, x, x), dict(mask=mask, return_logits=False, **{name: pos})
    )


def _train_step(layer, arguments, compiled=False):
    """One forward + backward of `sum(pooled)`: the gradients of the inputs
    and of every trainable weight. Eager, or `compiled` by XLA (JAX,
    TensorFlow)."""
    if compiled and BACKEND == "torch":
        raise ValueError("--long-compiled runs on JAX and TensorFlow (XLA)")
    if BACKEND == "torch":
        def step(x, *rest):
            x = x.detach().requires_grad_(True)
            for w in layer.trainable_weights:
                w.value.grad = None
            args, kwargs = arguments(x, *rest)
            keras.ops.sum(layer(*args, **kwargs)).backward()
            return x.grad
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        def step(x, *rest):
            with tf.GradientTape() as tape:
                tape.watch(x)
                args, kwargs = arguments(x, *rest)
                loss = keras.ops.sum(layer(*args, **kwargs))
            return tape.gradient(loss, [x] + [w.value for w in layer.trainable_weights])[0]

        if compiled:
            return tf.function(step, jit_compile=True)
    else:
        import jax

        def loss(x, trainable, rest):
            args, kwargs = arguments(x, *rest)
            non_trainable = [w.value for w in layer.non_trainable_variables]
            return keras.ops.sum(layer.stateless_call(trainable, non_trainable, *args,
                                                      **kwargs)[0])

        gradient = jax.grad(loss, argnums=(0, 1))
        if compiled:
            gradient = jax.jit(gradient)

        def step(x, *rest):
            if not layer.built:  # stateless_call needs the variables
                args, kwargs = arguments(x, *rest)
                layer(*args, **kwargs)
            trainable = [w.value for w in layer.trainable_variables]
            return gradient(x, trainable, rest)[0]
    return step


def long_point(system, length, backward=False, compiled=False):
    """Two eager pooled-only calls of one shape (forward + backward with
    `backward`), in a fresh process, after one at length 16 (which loads the
    code): the time of the second call, and the peak resident memory above
    the memory before the call it is read on, the inputs (positions too)
    made inside that window. torch and TensorFlow keep what they free, so
    their first call is read; JAX gives it back, so its second call is (its
    first also holds the compiler's own memory). Inference runs under
    torch's `no_grad`. `compiled` (XLA): the first call at `length` is
    read, compilation included; the warm-up at 16 only builds the layer."""
    import contextlib

    layer, arguments = _long_call(system, backward)
    if backward:
        call = _train_step(layer, arguments, compiled)
    else:
        def call(*inputs):
            args, kwargs = arguments(*inputs)
            return layer(*args, **kwargs)
    context = contextlib.nullcontext
    if BACKEND == "torch" and not backward:
        import torch

        context = torch.no_grad
    with context():  # loads the code paths (torch imports its compiler lazily)
        keras.ops.convert_to_numpy(call(*_long_inputs(system, 16)))
    measured = 1 if BACKEND == "jax" and not compiled else 0
    times = []
    for attempt in range(2):
        if attempt == measured:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak (VmHWM) to the current resident size
            before = _rss("VmRSS")
        inputs = _long_inputs(system, length)
        start = time.perf_counter()
        with context():
            keras.ops.convert_to_numpy(call(*inputs))
        times.append((time.perf_counter() - start) * 1e3)
        if attempt == measured:
            peak = _rss("VmHWM") - before
        del inputs
    return times[-1], peak


def run_long(args):
    import subprocess
    import sys

    lengths = [int(n) for n in args.long_lengths.split(",")]
    what = "forward + backward of the pooled output" if args.backward else "pooled-only call"
    how = "XLA-compiled, first call" if args.long_compiled else "eager"
    print(f"keras {keras.__version__}, backend {BACKEND} ({how}): one {what}, "
          f"batch 1, {HEADS} heads, D={SIZE}, a {POSITIONS}-row table"
          f"{' (trainable)' if args.backward else ''}; each point in its own process; "
          "memory includes the inputs (ours: (1, n, n, 1) offsets; ours_tokens: (1, n, 1) "
          "positions)")
    print(f"{'length':>7} {'system':20} {'ms':>9} {'peak RSS +MiB':>14}")
    points = {}
    for length in lengths:
        for system in args.long_systems.split(","):
            if (system in ("keras_mha", "keras_hub_deberta", "transformers_deberta")
                    and length > args.long_mha_max):
                print(f"{length:7} {system:20} skipped (its (1, 4, n, n) tensors alone: "
                      f"{4 * 4 * length**2 / 2**30:.0f} GiB each)")
                continue
            code = (f"import json, sys; sys.path.insert(0, {HERE!r}); import bench_long as b; "
                    f"print(json.dumps(b.long_point({system!r}, {length}, {args.backward}, "
                    f"{args.long_compiled})))")
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["killed"])[-1]
                print(f"{length:7} {system:20} failed: {last}")
                continue
            ms, peak = json.loads(done.stdout.strip().splitlines()[-1])
            points.setdefault(system, {})[length] = {"ms": ms, "peak_bytes": peak}
            print(f"{length:7} {system:20} {ms:9.1f} {peak / 2**20:14.1f}", flush=True)
    for length in lengths:
        mha = points.get("keras_mha", {}).get(length)
        for system in ("ours", "ours_tokens", "ours_sequence", "box_transformer"):
            ours = points.get(system, {}).get(length)
            if mha and ours:
                print(f"{length:7} {system:20} / keras_mha: time {ours['ms'] / mha['ms']:.2f}x, "
                      f"memory {ours['peak_bytes'] / max(mha['peak_bytes'], 1):.2f}x")
    for length in lengths:
        ours = points.get("deberta_model", {}).get(length)
        for peer in ("keras_hub_deberta", "transformers_deberta"):
            theirs = points.get(peer, {}).get(length)
            if ours and theirs:
                print(f"{length:7} deberta_model / {peer}: time {ours['ms'] / theirs['ms']:.2f}x, "
                      f"memory {ours['peak_bytes'] / max(theirs['peak_bytes'], 1):.2f}x")
    mode = "long_backward" if args.backward else "long"
    return {"backend": BACKEND, "mode": mode + ("_compiled" if args.long_compiled else ""),
            "points": points}
