"""`python benchmarks/bench_paths.py`: the paths' tables, per workload.

Each workload's forward (the logits returned), pooled (`--pooled`: the pooled
output alone) or forward + backward (`--backward`) call of RelativeAttention
against Keras MHA, edspdf and KerasHub's DeBERTa-v3 (bench_peers.py), timed
interleaved in one process; with `--plot`, time against sequence length.
`python benchmarks/bench.py` without `--model` or `--long` runs the same.
See bench.py for the systems and the workloads.
"""

import sys

if __name__ == "__main__":  # the command line first: --backend re-runs it before keras loads
    from bench import main

    sys.exit(main(sys.argv[1:], measure="paths", script=__file__, doc=__doc__))

import json

import keras
import numpy as np

from _bench_common import (BACKEND, HEADS, POSITIONS, SIZE, WORKLOADS, build_ours,
                           compiled_keras, make_data, mha_call, mha_pooled_call, ours_call,
                           ours_pooled_call, time_interleaved)
from bench_peers import deberta_system, edspdf_system
from keras_relattn.relative_attention import RelativeAttention


def systems_for(name_list, coords, data, backward, args):
    systems, notes = {}, {}
    ours = build_ours(coords)
    ours.build()
    if "edspdf" in name_list:
        try:
            systems["edspdf"], err = edspdf_system(coords, data, backward, ours)
            notes["max_abs_error_vs_edspdf"] = err
        except ImportError:
            notes["edspdf"] = "not installed"
    if "ours" in name_list:
        systems["ours"] = compiled_keras(
            ours, ours_pooled_call if args.pooled else ours_call, backward, data,
            args.torch_compile,
        )
    if "ours_c2c" in name_list:
        # The ablation: our layer with the content term only (no table), so
        # that ours - ours_c2c is what the position terms cost in this cell.
        content = RelativeAttention(SIZE, HEADS, mode=("c2c",), n_coordinates=coords)
        content.build()
        systems["ours_c2c"] = compiled_keras(
            content, ours_pooled_call if args.pooled else ours_call, backward, data,
            args.torch_compile,
        )
    if "keras_mha" in name_list:
        mha = keras.layers.MultiHeadAttention(HEADS, SIZE // HEADS)
        mha(data[0][:1], data[0][:1])
        systems["keras_mha"] = compiled_keras(
            mha, mha_pooled_call if args.pooled else mha_call, backward, data,
            args.torch_compile,
        )
    if "deberta" in name_list:
        try:
            systems["deberta"] = deberta_system(data, backward)
        except ImportError:
            notes["deberta"] = "keras_hub not installed"
    return systems, notes


def run(args):
    rng = np.random.default_rng(0)
    names = [s.strip() for s in args.systems.split(",")]
    kind = "forward+backward" if args.backward else "forward"
    compiler = {"jax": "jax.jit", "tensorflow": "XLA (tf.function jit_compile)",
                "torch": "torch.compile" if args.torch_compile else "eager"}[BACKEND]
    print(f"keras {keras.__version__}, backend {BACKEND} ({compiler}), {kind}, float32")
    print(f"D={SIZE}, {HEADS} heads, {POSITIONS}-entry table, medians of {args.repeats} "
          "interleaved rounds; edspdf runs torch eager\n")
    results = {"backend": BACKEND, "compiler": compiler, "mode": kind, "workloads": {}}
    header = (f"{'workload':8} {'system':10} {'median ms':>10} {'/ edspdf':>9} {'/ keras_mha':>12}"
              f" {'faults/call':>12}")
    print(header)
    print("-" * len(header))
    for w in [w.strip() for w in args.workloads.split(",")]:
        spec = WORKLOADS[w]
        data = make_data(rng, spec["batch"], spec["length"], spec["coords"])
        systems, notes = systems_for(names, spec["coords"], data, args.backward, args)
        faults = {}
        medians = time_interleaved(systems, args.repeats, faults=faults)
        entry = {"spec": spec, "median_ms": medians, "faults_per_call": faults, **notes}
        for name, ms in medians.items():
            r_e = ms / medians["edspdf"] if "edspdf" in medians else float("nan")
            r_m = ms / medians["keras_mha"] if "keras_mha" in medians else float("nan")
            print(f"{w:8} {name:10} {ms:10.2f} {r_e:9.2f} {r_m:12.2f} {faults[name]:12.0f}")
        if BACKEND == "jax" and "ours" in systems:
            mem = systems["ours"].memory()
            entry["ours_temp_bytes"] = int(mem.temp_size_in_bytes)
            if "keras_mha" in systems:
                entry["keras_mha_temp_bytes"] = int(systems["keras_mha"].memory().temp_size_in_bytes)
            print(f"{'':8} XLA temp memory: ours {entry['ours_temp_bytes'] / 2**20:.1f} MiB"
                  + (f", keras_mha {entry['keras_mha_temp_bytes'] / 2**20:.1f} MiB"
                     if "keras_mha_temp_bytes" in entry else ""))
        if "max_abs_error_vs_edspdf" in notes:
            print(f"{'':8} agreement with edspdf: max abs error "
                  f"{notes['max_abs_error_vs_edspdf']:.1e}")
        results["workloads"][w] = entry
    if args.plot:
        results["scaling"] = scaling(args, names, rng)
        plot(results["scaling"], args.plot, f"{BACKEND} ({compiler}), {kind}")
        print(f"\nplot written to {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"results written to {args.json}")
    return 0


def scaling(args, names, rng):
    lengths = [int(n) for n in args.plot_lengths.split(",")]
    curves = {}
    for length in lengths:
        data = make_data(rng, args.plot_batch, length, 1)
        systems, _ = systems_for(names, 1, data, args.backward, args)
        for name, ms in time_interleaved(systems, max(3, args.repeats // 3), warmup=1).items():
            curves.setdefault(name, {})[length] = ms
        print(f"  length {length}: " + ", ".join(
            f"{n} {curves[n][length]:.1f} ms" for n in curves if length in curves[n]))
    return curves


def plot(curves, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("median time (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
