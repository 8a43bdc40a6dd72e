"""The banded path's training step against Keras MHA, and where its time goes.

    python benchmarks/profile_band.py --backend torch [--length 4096] [--repeats 5]

One forward + backward of the pooled output (batch 1, 4 heads, D=128, a
64-row trainable table, `sequence_positions=True`, the mask given: the
repository's `ours_sequence` long system, `bench_long._train_step`) and of
Keras MHA on the same input, interleaved, in this process: the best call
after the first of each (steady state) and their ratio. Then the top ops of
one of our steps by self time: `torch.profiler` on torch; on TensorFlow and
JAX, Python's profiler (eager TensorFlow's cost is dispatch: each op call
shows as the Python function that issues it).
"""

import argparse
import sys
import time

from _relaunch import on_backend


def parse(argv):
    p = argparse.ArgumentParser(prog="python benchmarks/profile_band.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["tensorflow", "jax", "torch"], required=True)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--top", type=int, default=15)
    return p.parse_args(argv)


def main(argv):
    args = parse(argv)
    code = on_backend(args.backend, __file__, argv)
    if code is not None:
        return code
    import keras

    import bench_long as b

    steps = {}
    for system in ("ours_sequence", "keras_mha"):
        layer, arguments = b._long_call(system, backward=True)
        inputs = b._long_inputs(system if system != "ours_sequence" else "keras_mha",
                                args.length)
        step = b._train_step(layer, arguments)
        keras.ops.convert_to_numpy(step(*inputs))  # builds, traces, warms
        steps[system] = (step, inputs)
    best = {name: float("inf") for name in steps}
    for _ in range(args.repeats):
        for name, (step, inputs) in steps.items():
            start = time.perf_counter()
            keras.ops.convert_to_numpy(step(*inputs))
            best[name] = min(best[name], time.perf_counter() - start)
    print(f"keras {keras.__version__}, backend {args.backend}, {args.length} tokens, "
          f"fwd+bwd, best of {args.repeats} after the first")
    for name, seconds in best.items():
        print(f"  {name:14} {seconds * 1000:9.1f} ms")
    print(f"  ours_sequence / keras_mha: {best['ours_sequence'] / best['keras_mha']:.2f}x")
    step, inputs = steps["ours_sequence"]
    print(f"\nTop {args.top} ops of one ours_sequence step, by self time:")
    if args.backend == "torch":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(*inputs)
        events = sorted(prof.key_averages(group_by_input_shape=True),
                        key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        print(f"{'self ms':>8} {'share':>6} {'calls':>6}  op  input shapes")
        for e in events[:args.top]:
            print(f"{e.self_cpu_time_total / 1000:8.1f} {e.self_cpu_time_total / total:6.1%} "
                  f"{e.count:6d}  {e.key}  {str(e.input_shapes)[:110]}")
        print(f"total self time {total / 1000:.1f} ms")
    else:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        keras.ops.convert_to_numpy(step(*inputs))
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
