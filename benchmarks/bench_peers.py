"""`python benchmarks/bench_peers.py`: ours against its peers, and in a model.

Run on its own (or as `python benchmarks/bench.py --model`): `train_on_batch`
of a 2-block `RelativeTransformerLayer` model against the same model with
Keras MHA, timed interleaved (`--model-length N`: batch 1 x N, per-token
positions). It also holds the peers the other files time ours against:
edspdf's `RelativeAttention` and KerasHub's DeBERTa-v3 attention (bench_paths.py),
and 2 DeBERTa-v3 layers on `keras_relattn.deberta`, in KerasHub and in
Hugging Face's transformers (bench_long.py's `deberta_model`,
`keras_hub_deberta`, `transformers_deberta`).
"""

import sys

if __name__ == "__main__":  # the command line first: --backend re-runs it before keras loads
    from bench import main

    sys.exit(main(sys.argv[1:], measure="model", script=__file__, doc=__doc__))

import keras
import numpy as np

from _bench_common import (BACKEND, HEADS, POSITIONS, SIZE, compiled_keras, make_data,
                           time_interleaved)

# edspdf's and KerasHub's attention, for the paths' tables (bench_paths.py) ---------


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


# 2 DeBERTa-v3 layers: ours, KerasHub's, Hugging Face's (bench_long.py) --------

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
