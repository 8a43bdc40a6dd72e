"""The benchmark's body (imported after the backend is fixed); see bench.py."""

import json
import statistics
import time

import keras
import numpy as np

from keras_relattn.bench import HEADS, POSITIONS, SIZE, WORKLOADS
from keras_relattn.relative_attention import RelativeAttention

BACKEND = keras.backend.backend()


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


def edspdf_system(coords, data, backward, ours):
    """The edspdf module and its runner; also checks `ours` against it."""
    import torch
    from edspdf.layers.relative_attention import RelativeAttention as Edspdf

    from keras_relattn.porting import load_edspdf_state_dict

    torch.manual_seed(0)
    table = torch.randn(POSITIONS, SIZE)
    module = Edspdf(SIZE, HEADS, position_embedding=table, n_coordinates=coords,
                    mode=("c2c", "p2c", "c2p")).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.1)
    load_edspdf_state_dict(ours, module.state_dict())
    x, mask, rel = data
    # Agreement first, on the first two samples.
    with torch.no_grad():
        want = module(*(torch.as_tensor(a[:2]) for a in (x, x, x, mask)),
                      relative_positions=torch.as_tensor(rel[:2]).long())
    got = ours(x[:2], x[:2], x[:2], mask=mask[:2], relative_positions=rel[:2])
    err = max(float(np.abs(keras.ops.convert_to_numpy(g) - w.numpy()).max())
              for g, w in zip(got, want))
    if err > 1e-4:
        raise AssertionError(f"ours differs from edspdf by {err:.2e}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module.to(device)
    tx, tm, tr = (torch.as_tensor(a).to(device) for a in (x, mask, rel))
    tr = tr.long()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if backward:
        def run():
            module.zero_grad()
            pooled, logits = module(tx, tx, tx, tm, relative_positions=tr)
            (pooled.sum() + logits.sum()).backward()
            sync()
        return run, err

    def run_forward():
        with torch.no_grad():
            module(tx, tx, tx, tm, relative_positions=tr)
        sync()
    return run_forward, err


def deberta_system(data, backward):
    from keras_hub.src.models.deberta_v3.disentangled_self_attention import (
        DisentangledSelfAttention,
    )
    from keras_hub.src.models.deberta_v3.relative_embedding import RelativeEmbedding

    x, mask, _ = data
    layer = DisentangledSelfAttention(num_heads=HEADS, hidden_dim=SIZE,
                                      max_position_embeddings=512, bucket_size=POSITIONS // 2)
    table = RelativeEmbedding(hidden_dim=SIZE, bucket_size=POSITIONS // 2, layer_norm_epsilon=1e-7,
                              kernel_initializer="glorot_uniform")
    rel_embeddings = table(x)
    attn_mask = mask[:, None, :] & mask[:, :, None]

    def call(layer, x, rel_embeddings, attn_mask):
        return layer(x, rel_embeddings=rel_embeddings, attention_mask=attn_mask,
                     return_attention_scores=True)
    return compiled_keras(layer, call, backward, (x, keras.ops.convert_to_numpy(rel_embeddings),
                                                  attn_mask))


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


def time_interleaved(systems, repeats, warmup=2, block=3):
    """Median milliseconds per system, over `repeats` rounds of `block` calls.

    Rounds interleave the systems (so slow drifts of the machine hit them
    all) and rotate their order. Within a round each system first makes one
    untimed call: the first call after another system pays for that
    system's leftovers (torch's OpenMP workers spinning down took a core
    from XLA: +60% on W1), which no user running one system sees.
    """
    for fn in systems.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in systems}
    names = list(systems)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            systems[name]()
            for _ in range(block):
                start = time.perf_counter()
                systems[name]()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


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
    header = f"{'workload':8} {'system':10} {'median ms':>10} {'/ edspdf':>9} {'/ keras_mha':>12}"
    print(header)
    print("-" * len(header))
    for w in [w.strip() for w in args.workloads.split(",")]:
        spec = WORKLOADS[w]
        data = make_data(rng, spec["batch"], spec["length"], spec["coords"])
        systems, notes = systems_for(names, spec["coords"], data, args.backward, args)
        medians = time_interleaved(systems, args.repeats)
        entry = {"spec": spec, "median_ms": medians, **notes}
        for name, ms in medians.items():
            r_e = ms / medians["edspdf"] if "edspdf" in medians else float("nan")
            r_m = ms / medians["keras_mha"] if "keras_mha" in medians else float("nan")
            print(f"{w:8} {name:10} {ms:10.2f} {r_e:9.2f} {r_m:12.2f}")
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
