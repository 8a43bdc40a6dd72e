"""Where the banded path starts to pay, per backend: `sequence_positions=True`
(the band) against the same layer on per-token positions (the per-token
path, the same numbers), at short lengths.

    python benchmarks/band_crossover.py --backend torch [--compiled] [--backward]

Batch `--batch`, 4 heads, D=128, a 64-row table (the repository's long
systems, `bench_long`), timed interleaved in one process (median of
`--repeats` rounds of 3 calls, steady state). Prints the ratio banded / per
token at each length: above 1, the per-token path is faster there. The
backends' `BAND_MIN_KEYS` (the length from which the band is taken) are
read from this table (benchmarks/band_crossover.txt).
"""

import argparse
import sys

from _relaunch import on_backend


def parse(argv):
    p = argparse.ArgumentParser(prog="python benchmarks/band_crossover.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["tensorflow", "jax", "torch"], required=True)
    p.add_argument("--lengths", default="128,256,384,512,768,1024")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--backward", action="store_true", help="forward + backward")
    p.add_argument("--compiled", action="store_true", help="jax.jit / XLA (JAX, TensorFlow)")
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args(argv)


def main(argv):
    args = parse(argv)
    code = on_backend(args.backend, __file__, argv)
    if code is not None:
        return code
    import keras

    import bench_long as b
    from _bench_common import compiled_keras, time_interleaved
    from keras_relattn import config

    how = ("compiled" if args.compiled else "eager") + (", fwd+bwd" if args.backward
                                                        else ", forward")
    print(f"keras {keras.__version__}, backend {args.backend} ({how}), batch {args.batch}, "
          f"median of {args.repeats} rounds; ms")
    print(f"{'length':>7} {'banded':>9} {'per-token':>10} {'banded/per-token':>17}")
    for length in [int(n) for n in args.lengths.split(",")]:
        systems = {}
        for name, system in (("banded", "ours_sequence"), ("per_token", "ours_tokens")):
            layer, arguments = b._long_call(system, args.backward)
            inputs = b._long_inputs(system if system == "ours_tokens" else "keras_mha", length)
            if args.batch > 1:
                inputs = tuple(keras.ops.repeat(x, args.batch, axis=0) if i < 2 else x
                               for i, x in enumerate(inputs))
            if args.backward:
                step = b._train_step(layer, arguments, args.compiled)

                def run(step=step, inputs=inputs):
                    keras.ops.convert_to_numpy(step(*inputs))
            else:
                def forward(layer, *xs, arguments=arguments):
                    a, kw = arguments(*xs)
                    return layer(*a, **kw)

                if args.compiled or args.backend == "torch":  # torch: eager, no_grad
                    run = compiled_keras(layer, forward, False, inputs)
                else:
                    def run(layer=layer, inputs=inputs, forward=forward):
                        keras.ops.convert_to_numpy(forward(layer, *inputs))

            systems[name] = run
        with config.block_settings(band_min_keys=1) as log:  # the band wherever it fits
            times = time_interleaved(systems, args.repeats)
        banded = any(plan.band_width for plan in log.plans)
        ratio = times["banded"] / times["per_token"]
        print(f"{length:7d} {times['banded']:9.2f} {times['per_token']:10.2f} {ratio:17.2f}"
              f"{'' if banded else '  (no band: it would cover every key)'}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
