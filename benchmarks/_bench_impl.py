"""The benchmark's body (imported after the backend is fixed); see bench.py."""

import json
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


# --model: a 2-block model's train_on_batch against the same model with MHA ---------

MODEL = dict(batch=8, length=256, coords=2, blocks=2)


class MHABlock(keras.layers.Layer):
    """The same block as `RelativeTransformerLayer`, with Keras MHA inside."""

    def __init__(self, size, heads, **kwargs):
        super().__init__(**kwargs)
        self.attention = keras.layers.MultiHeadAttention(heads, size // heads, use_bias=True)
        self.norm = keras.layers.LayerNormalization(epsilon=1e-5)
        self.norm2 = keras.layers.LayerNormalization(epsilon=1e-5)
        self.linear1 = keras.layers.Dense(2 * size)
        self.linear2 = keras.layers.Dense(size)

    def call(self, x, mask):
        x = self.norm(x + self.attention(x, x, attention_mask=mask[:, None, :]))
        update = self.linear2(keras.activations.gelu(self.linear1(x), approximate=False))
        return self.norm2(x + update)


def build_model(kind, coords, per_token=False):
    """The 2-block model; `per_token`: its positions input holds each
    token's coordinates `(batch, length, coords)`, not `(batch, length,
    length, coords)` offsets."""
    from keras_relattn import RelativeTransformerLayer

    tokens = keras.Input((None, SIZE))
    mask = keras.Input((None,), dtype="bool")
    positions = keras.Input((None, coords) if per_token else (None, None, coords), dtype="int32")
    given = dict(positions=positions) if per_token else dict(relative_positions=positions)
    x = tokens
    for _ in range(MODEL["blocks"]):
        if kind == "ours":
            x = RelativeTransformerLayer(
                SIZE, HEADS, init_resweight=1.0, n_coordinates=coords,
                position_embedding_shape=(POSITIONS, SIZE),
            )(x, mask=mask, return_logits=False, **given)
        else:
            x = MHABlock(SIZE, HEADS)(x, mask)
    model = keras.Model([tokens, mask, positions], keras.layers.Dense(1)(x))
    return model


def model_spec(args):
    """The model workload: 8 x 256 with 2-D offsets, or with `--model-length
    N` batch 1 x N with 1-D per-token positions (training at length)."""
    if args.model_length:
        return dict(batch=1, length=args.model_length, coords=1, blocks=MODEL["blocks"],
                    per_token=True)
    return dict(MODEL, per_token=False)


def model_systems(args, rng):
    spec = model_spec(args)
    if spec["per_token"]:
        x = rng.normal(size=(1, spec["length"], SIZE)).astype("float32")
        mask = np.ones((1, spec["length"]), bool)
        rel = np.arange(spec["length"], dtype="int32")[None, :, None]
    else:
        x, mask, rel = make_data(rng, spec["batch"], spec["length"], spec["coords"])
    target = rng.normal(size=(spec["batch"], spec["length"], 1)).astype("float32")
    jit = args.torch_compile if BACKEND == "torch" else True
    systems = {}
    for kind in ("ours", "keras_mha"):
        model = build_model(kind, spec["coords"], spec["per_token"])
        model.compile("adam", "mse", jit_compile=jit)

        def step(model=model):
            model.train_on_batch([x, mask, rel], target)
        systems[kind] = step
    return systems


def run_model(args):
    rng = np.random.default_rng(0)
    compiler = {"jax": "jax.jit", "tensorflow": "XLA",
                "torch": "torch.compile" if args.torch_compile else "eager"}[BACKEND]
    spec = model_spec(args)
    print(f"keras {keras.__version__}, backend {BACKEND} ({compiler}): train_on_batch of "
          f"{spec['blocks']} blocks, batch {spec['batch']} x {spec['length']}, "
          f"{spec['coords']}-D positions{' per token' if spec['per_token'] else ''}; "
          "ours return_logits=False")
    faults = {}
    medians = time_interleaved(model_systems(args, rng), args.repeats, faults=faults)
    for name, ms in medians.items():
        print(f"{name:10} {ms:10.2f} ms {ms / medians['keras_mha']:8.2f} x keras_mha"
              f" {faults[name]:8.0f} faults/call")
    return {"backend": BACKEND, "compiler": compiler, "mode": "model", "spec": spec,
            "median_ms": medians, "faults_per_call": faults}


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


class _DebertaLayers(keras.layers.Layer):
    """The 2 encoder layers of a hidden-64 DeBERTa-v3 (`keras_relattn.deberta`,
    its v3 buckets: 256, 512) on given embeddings: what training a long
    document adds beyond the embedding lookup."""

    def __init__(self):
        super().__init__()
        from keras_relattn import deberta

        self.encoder = deberta.DebertaV3Encoder(
            vocabulary_size=128, num_layers=2, num_heads=4, hidden_dim=64,
            intermediate_dim=256, dropout=0.0, attention_dropout=0.0)

    def build(self, *shapes):
        self.encoder.build()

    def call(self, x, mask):
        encoder = self.encoder
        table = encoder.relative_norm(encoder.relative_table)
        for block in encoder.blocks:
            attended = block["attention"](x, x, x, mask=mask, position_embedding=table,
                                          return_logits=False)
            x = block["attention_norm"](x + block["attention_output"](attended))
            hidden = keras.activations.gelu(block["intermediate"](x), approximate=False)
            x = block["output_norm"](x + block["output"](hidden))
        return x


class _KerasHubDebertaLayers(keras.layers.Layer):
    """The same 2 layers in KerasHub's DeBERTa-v3 (`DisentangledAttentionEncoder`
    and its `RelativeEmbedding`, as `DebertaV3Backbone` builds them)."""

    def __init__(self):
        super().__init__()
        from keras_hub.src.models.deberta_v3.disentangled_attention_encoder import (
            DisentangledAttentionEncoder,
        )
        from keras_hub.src.models.deberta_v3.relative_embedding import RelativeEmbedding

        self.table = RelativeEmbedding(hidden_dim=64, bucket_size=256, layer_norm_epsilon=1e-7)
        self.blocks = [
            DisentangledAttentionEncoder(num_heads=4, intermediate_dim=256,
                                         max_position_embeddings=512, bucket_size=256,
                                         dropout=0.0, activation=keras.activations.gelu,
                                         layer_norm_epsilon=1e-7)
            for _ in range(2)
        ]

    def call(self, x, mask):
        table = self.table(x)
        for block in self.blocks:
            x = block(x, rel_embeddings=table, padding_mask=mask)
        return x


class _TransformersDebertaLayers(keras.layers.Layer):
    """The same 2 layers in Hugging Face's `DebertaV2Encoder` (torch only;
    Keras tracks the torch module's parameters)."""

    def __init__(self):
        super().__init__()
        if BACKEND != "torch":
            raise ValueError("the transformers_deberta system runs on the torch backend")
        from transformers import DebertaV2Config
        from transformers.models.deberta_v2.modeling_deberta_v2 import DebertaV2Encoder

        self.encoder = DebertaV2Encoder(DebertaV2Config(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
            relative_attention=True, position_buckets=256, max_relative_positions=-1,
            max_position_embeddings=512, pos_att_type=["p2c", "c2p"],
            position_biased_input=False, share_att_key=True, norm_rel_ebd="layer_norm",
            type_vocab_size=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))

    def call(self, x, mask):
        out = self.encoder(x, keras.ops.cast(mask, "int32"), output_hidden_states=False)
        return out.last_hidden_state


DEBERTA_MODELS = {
    "deberta_model": _DebertaLayers,
    "keras_hub_deberta": _KerasHubDebertaLayers,
    "transformers_deberta": _TransformersDebertaLayers,
}


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
            code = (f"import json, sys; sys.path.insert(0, {HERE!r}); import _bench_impl as b; "
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
