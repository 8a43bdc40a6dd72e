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
import resource
import subprocess
import sys
import time

import numpy as np


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=("jax", "tensorflow"), default="jax")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    if os.environ.get("KERAS_BACKEND") != args.backend:
        env = dict(os.environ, KERAS_BACKEND=args.backend, TF_CPP_MIN_LOG_LEVEL="2")
        return subprocess.call([sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env=env)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import keras
    from _bench_impl import WORKLOADS, build_ours, make_data

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
        if args.backend == "jax":
            import jax

            calls = {k: (lambda f: lambda: jax.block_until_ready(f(values, others, x, mask, rel)))(
                jax.jit(f)) for k, f in variants.items()}
        else:
            import tensorflow as tf

            # Eager TensorFlow returns computed tensors (CPU): no copy out.
            calls = {k: (lambda f: lambda: f(values, others, x, mask, rel))(
                tf.function(f, jit_compile=True)) for k, f in variants.items()}
        times = {k: [] for k in calls}
        faults = {k: 0 for k in calls}
        for fn in calls.values():
            fn(), fn()
        for r in range(args.repeats):
            for k in list(calls)[r % 3:] + list(calls)[: r % 3]:
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                calls[k]()
                times[k].append(time.perf_counter() - start)
                faults[k] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        medians = {k: np.median(t) * 1e3 for k, t in times.items()}
        base = medians["both outputs"]
        temps = {}
        if args.backend == "jax":
            temps = {k: jax.jit(f).lower(values, others, x, mask, rel).compile()
                     .memory_analysis().temp_size_in_bytes / 2**20 for k, f in variants.items()}
        print(f"{name}: " + ", ".join(f"{k} {m:.2f} ({m / base:.2f}x)" for k, m in medians.items()))
        print("    faults/call: " + ", ".join(
            f"{k} {faults[k] / args.repeats:.0f}" for k in calls)
            + ("; XLA temporaries MiB: " + ", ".join(f"{k} {t:.0f}" for k, t in temps.items())
               if temps else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
