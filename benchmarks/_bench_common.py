"""What the benchmarks share (imported after the backend is fixed: it imports
keras): the workloads and their data, the compiled runners of a layer, the
calls of ours and of Keras MHA, and the interleaved timing. See bench.py."""

import os
import resource
import statistics
import time

import keras
import numpy as np

from keras_relattn.relative_attention import RelativeAttention

BACKEND = keras.backend.backend()
HERE = os.path.dirname(os.path.abspath(__file__))

WORKLOADS = {
    "W1": dict(batch=8, length=128, coords=1),
    "W2": dict(batch=4, length=512, coords=1),
    "W3": dict(batch=8, length=256, coords=2),
}
SIZE, HEADS, POSITIONS = 128, 4, 64


def make_data(rng, batch, length, coords):
    x = rng.normal(size=(batch, length, SIZE)).astype("float32")
    mask = np.ones((batch, length), bool)
    rel = rng.integers(-(POSITIONS // 2), POSITIONS // 2, size=(batch, length, length, coords))
    return x, mask, rel.astype("int32")


def _flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def compiled_keras(layer, call, backward, args, torch_compile=False):
    """A zero-argument function running `call(layer, *data)` compiled, synced."""
    data = [keras.ops.convert_to_tensor(a) for a in args]
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        def forward(tv, ntv, *data):
            with keras.StatelessScope(state_mapping=list(zip(layer.trainable_variables, tv))
                                      + list(zip(layer.non_trainable_variables, ntv))):
                return call(layer, *data)

        if backward:
            def loss(tv, ntv, *data):
                return sum(jnp.sum(o) for o in _flat(forward(tv, ntv, *data)))
            fn = jax.jit(jax.grad(loss))
        else:
            fn = jax.jit(forward)
        tv = [v.value for v in layer.trainable_variables]
        ntv = [v.value for v in layer.non_trainable_variables]
        runner = lambda: jax.block_until_ready(fn(tv, ntv, *data))  # noqa: E731
        runner.memory = lambda: fn.lower(tv, ntv, *data).compile().memory_analysis()
        return runner
    if BACKEND == "tensorflow":
        import tensorflow as tf

        if backward:
            def step(*data):
                with tf.GradientTape() as tape:
                    loss = sum(tf.reduce_sum(o) for o in _flat(call(layer, *data)))
                return tape.gradient(loss, layer.trainable_variables)
        else:
            def step(*data):
                return call(layer, *data)
        fn = tf.function(step, jit_compile=True)
        return lambda: [tf.reshape(o, [-1])[:1].numpy() for o in _flat(fn(*data))]
    import torch

    fn = (lambda *d: call(layer, *d))
    if torch_compile:
        fn = torch.compile(fn)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    if backward:
        def run():
            for v in layer.trainable_variables:
                v.value.grad = None
            sum(o.sum() for o in _flat(fn(*data))).backward()
            sync()
        return run

    def run_forward():
        with torch.no_grad():
            fn(*data)
        sync()
    return run_forward


def ours_call(layer, x, mask, rel):
    return layer(x, x, x, mask=mask, relative_positions=rel)


def mha_call(layer, x, mask, rel):
    return layer(x, x, attention_mask=mask[:, None, :], return_attention_scores=True)


def ours_pooled_call(layer, x, mask, rel):
    return layer(x, x, x, mask=mask, relative_positions=rel, return_logits=False)


def mha_pooled_call(layer, x, mask, rel):
    return layer(x, x, attention_mask=mask[:, None, :])


def build_ours(coords):
    return RelativeAttention(SIZE, HEADS, position_embedding_shape=(POSITIONS, SIZE),
                             n_coordinates=coords, mode=("c2c", "c2p", "p2c"))


def time_interleaved(systems, repeats, warmup=2, block=3, faults=None):
    """Median milliseconds per system, over `repeats` rounds of `block` calls.

    Rounds interleave the systems (so slow drifts of the machine hit them
    all) and rotate their order. Within a round each system first makes one
    untimed call: the first call after another system pays for that
    system's leftovers (torch's OpenMP workers spinning down took a core
    from XLA: +60% on W1), which no user running one system sees.

    `faults`, a dict, receives each system's mean minor page faults per
    timed call: a compiled call whose temporaries pass glibc's 32 MiB
    ceiling gets them from the system afresh every call (see
    docs/performance.md, "Page faults"), which the time includes.
    """
    for fn in systems.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in systems}
    minor = {name: 0 for name in systems}
    names = list(systems)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            systems[name]()
            for _ in range(block):
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                systems[name]()
                times[name].append(time.perf_counter() - start)
                minor[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    if faults is not None:
        faults.update({name: minor[name] / len(times[name]) for name in systems})
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}
