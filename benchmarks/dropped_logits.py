"""Issue 10, item 3: under XLA, `layer(...)[0]` (the logits dropped by the
caller) against returning both outputs and against `return_logits=False`.

Usage: python benchmarks/dropped_logits.py --backend jax|tensorflow
Prints medians (interleaved rounds) at the benchmark's workloads, the minor
page faults per call and, on JAX, XLA's temporary memory per variant: past
glibc's 32 MiB ceiling, a call's temporaries are faulted in afresh on every
call (docs/performance.md, "Page faults").
"""

import argparse
import os
import sys

import numpy as np

from _relaunch import on_backend


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=("jax", "tensorflow"), default="jax")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    code = on_backend(args.backend, __file__, sys.argv[1:])
    if code is not None:
        return code
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import keras
    from _bench_common import WORKLOADS, build_ours, make_data, time_interleaved

    rng = np.random.default_rng(0)
    print(f"keras {keras.__version__}, {args.backend}, compiled; medians in ms")
    for name, spec in WORKLOADS.items():
        layer = build_ours(spec["coords"])
        layer.build()
        x, mask, rel = (keras.ops.convert_to_tensor(v) for v in
                        make_data(rng, spec["batch"], spec["length"], spec["coords"]))
        # The data are arguments of the compiled function, never constants
        # closed over: XLA would fold the index arithmetic into them and
        # fuse differently than for a user's inputs.
        def variant(select, **kwargs):
            def call(v, n, x, mask, rel):
                out = layer.stateless_call(v, n, x, x, x, mask=mask, relative_positions=rel,
                                           **kwargs)[0]
                return select(out)
            return call

        variants = {
            "both outputs": variant(lambda out: out),
            "[0] (logits dropped)": variant(lambda out: out[0]),
            "return_logits=False": variant(lambda out: out, return_logits=False),
        }
        values = [w.value for w in layer.trainable_variables]
        others = [w.value for w in layer.non_trainable_variables]
        data = (values, others, x, mask, rel)
        temps = {}
        if args.backend == "jax":
            import jax

            compiled = {k: jax.jit(f) for k, f in variants.items()}
            calls = {k: (lambda f: lambda: jax.block_until_ready(f(*data)))(f)
                     for k, f in compiled.items()}
            temps = {k: f.lower(*data).compile().memory_analysis().temp_size_in_bytes / 2**20
                     for k, f in compiled.items()}
        else:
            import tensorflow as tf

            # Eager TensorFlow returns computed tensors (CPU): no copy out.
            calls = {k: (lambda f: lambda: f(*data))(tf.function(f, jit_compile=True))
                     for k, f in variants.items()}
        faults = {}
        medians = time_interleaved(calls, args.repeats, faults=faults)
        base = medians["both outputs"]
        print(f"{name}: " + ", ".join(f"{k} {m:.2f} ({m / base:.2f}x)" for k, m in medians.items()))
        print("    faults/call: " + ", ".join(f"{k} {n:.0f}" for k, n in faults.items())
              + ("; XLA temporaries MiB: " + ", ".join(f"{k} {t:.0f}" for k, t in temps.items())
                 if temps else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
