"""What bounds a long training step: ablation by attention term, and a profile.

    python benchmarks/profile_long.py --backend torch [--length 4096]

One eager forward and one forward + backward of the pooled output (batch 1,
4 heads, D=128, a 64-row trainable table, per-token 1-D positions, the mask
given), for Keras MHA and for our layer with the content term alone, with
c2c + c2p, and with every term: the best of 3 calls each, in this process.
Then, on torch, the `torch.profiler` table of one full step, by operator and
input shape; on TensorFlow, the eager cost of one block's gather and of its
gradient (the position terms' share), in the two layouts. Results:
benchmarks/profile_long_<backend>.txt; docs/performance.md reads them.
"""

import argparse
import os
import sys
import time

from _relaunch import on_backend


def parse(argv):
    p = argparse.ArgumentParser(prog="python benchmarks/profile_long.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["tensorflow", "jax", "torch"], required=True)
    p.add_argument("--length", type=int, default=4096)
    return p.parse_args(argv)


MODES = {"c2c": ("c2c",), "c2c+c2p": ("c2c", "c2p"), "every term": ("c2c", "c2p", "p2c")}


def best_ms(step, repeats=3):
    import keras

    keras.ops.convert_to_numpy(step())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        keras.ops.convert_to_numpy(step())
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)


def ablation(length):
    import bench_long as b
    import keras
    from keras_relattn import RelativeAttention

    x, mask, pos = b._long_inputs("ours_tokens", length)
    mha, mha_arguments = b._long_call("keras_mha", True)
    systems = {"keras_mha": (mha, lambda x_: mha_arguments(x_, mask))}
    for name, mode in MODES.items():
        layer = RelativeAttention(b.SIZE, b.HEADS, mode=mode,
                                  position_embedding_shape=(b.POSITIONS, b.SIZE),
                                  position_embedding_trainable=True)
        systems[name] = (layer, lambda x_: ((x_, x_, x_), dict(
            mask=mask, query_positions=pos, return_logits=False)))
    results = {}
    for backward in (False, True):
        for name, (layer, arguments) in systems.items():
            if backward:
                step = b._train_step(layer, arguments)
                ms = best_ms(lambda step=step: step(x))
            else:
                def call(layer=layer, arguments=arguments):
                    args, kwargs = arguments(x)
                    return layer(*args, **kwargs)

                ms = best_ms(call)
            results[(backward, name)] = ms
            print(f"{'fwd+bwd' if backward else 'forward':8} {name:11} {ms:8.0f} ms  "
                  f"{ms / results[(backward, 'keras_mha')]:5.2f}x MHA", flush=True)
    return results


def torch_profile(length):
    import bench_long as b
    import keras
    from torch.profiler import ProfilerActivity, profile

    layer, arguments = b._long_call("ours_tokens", True)
    step = b._train_step(layer, arguments)
    inputs = b._long_inputs("ours_tokens", length)
    keras.ops.convert_to_numpy(step(*inputs))
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        keras.ops.convert_to_numpy(step(*inputs))
    events = sorted(prof.key_averages(group_by_input_shape=True),
                    key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\ntorch.profiler, one fwd+bwd of every term (self CPU, {total / 1e3:.0f} ms in all "
          "under the profiler):")
    for e in events[:24]:
        print(f"{e.key[:30]:30} {e.self_cpu_time_total / 1e3:8.1f} ms {100 * e.self_cpu_time_total / total:5.1f}% "
              f"{e.count:5d} calls  {str(e.input_shapes)[:90]}")


def tensorflow_gathers(length):
    import numpy as np
    import tensorflow as tf

    import _bench_common as b

    heads, positions = b.HEADS, b.POSITIONS
    rows = 2**23 // (heads * length)  # one block of the recomputed path
    rng = np.random.default_rng(0)

    def ms(fn):
        return best_ms(fn, repeats=5)

    idx = tf.constant(rng.integers(0, positions, size=(1, rows, length)).astype("int32"))
    flat = idx + tf.range(rows, dtype=tf.int32)[None, :, None] * positions
    head_major = tf.constant(rng.normal(size=(heads, rows * positions)).astype("float32"))
    by_rows = tf.constant(rng.normal(size=(rows * positions, heads)).astype("float32"))
    upstream = tf.constant(rng.normal(size=(heads, 1, rows, length)).astype("float32"))

    def gradient(params, axis, up):
        with tf.GradientTape() as tape:
            tape.watch(params)
            taken = tf.gather(params, flat, axis=axis)
        return tf.convert_to_tensor(tape.gradient(taken, params, output_gradients=up))

    taken = tf.gather(by_rows, flat, axis=0)
    up_rows = tf.transpose(upstream, (1, 2, 3, 0))
    print(f"\nTensorFlow eager, one block of {rows} queries x {length} keys x {heads} heads "
          "(one position term):")
    print(f"  gather, heads-major (the layer's):  {ms(lambda: tf.gather(head_major, flat, axis=1)):6.1f} ms")
    print(f"  its gradient:                       {ms(lambda: gradient(head_major, 1, upstream)):6.1f} ms")
    print(f"  gather of rows of heads (axis 0):   {ms(lambda: tf.gather(by_rows, flat, axis=0)):6.1f} ms")
    print(f"  + transpose to (b, h, q, k):        {ms(lambda: tf.transpose(taken, (0, 3, 1, 2))):6.1f} ms")
    print(f"  its gradient:                       {ms(lambda: gradient(by_rows, 0, up_rows)):6.1f} ms")


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    code = on_backend(args.backend, __file__, argv if argv is not None else sys.argv[1:])
    if code is not None:
        return code
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import keras

    print(f"keras {keras.__version__}, backend {args.backend} (eager), {args.length} tokens, "
          "batch 1, 4 heads, D=128, a 64-row trainable table, per-token positions:")
    ablation(args.length)
    if args.backend == "torch":
        torch_profile(args.length)
    elif args.backend == "tensorflow":
        tensorflow_gathers(args.length)
    return 0


if __name__ == "__main__":
    sys.exit(main())
