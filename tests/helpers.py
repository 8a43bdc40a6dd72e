"""What the test modules share: the backend, array conversion, the real
edspdf layer and gradients on every backend. (Fixtures live in conftest.)"""

import keras
import numpy as np

BACKEND = keras.backend.backend()


def to_numpy(x):
    if x is None:
        return None
    if hasattr(x, "detach"):  # a torch tensor that may require grad
        x = x.detach()
    return np.asarray(keras.ops.convert_to_numpy(x))


def edspdf_module(rng, size, n_heads, table=None, trainable_table=False, **kwargs):
    """The real edspdf layer with *every* parameter randomized (biases too)."""
    import torch
    from edspdf.layers.relative_attention import RelativeAttention as Torch

    if table is not None:
        table = torch.tensor(table)
        if trainable_table:
            table = torch.nn.Parameter(table)
    module = Torch(size, n_heads, position_embedding=table, **kwargs)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.tensor(rng.normal(0.0, 0.5, size=param.shape)))
    return module.eval()


def run_edspdf(module, inputs):
    """Calls the torch module with numpy inputs, returns numpy outputs."""
    import torch

    args = {k: None if v is None else torch.as_tensor(v) for k, v in inputs.items()}
    with torch.no_grad():
        out = module(**args)
    if isinstance(out, tuple):
        return tuple(o.numpy() for o in out)
    return out.numpy()


def gradients(layer, loss_fn, inputs):
    """Gradients of `loss_fn(layer(**inputs))` w.r.t. the queries, then each
    trainable weight, as numpy arrays, on any backend (`loss_fn` uses
    `keras.ops` and returns a scalar)."""
    inputs = dict(inputs)
    q = keras.ops.convert_to_tensor(inputs.pop("content_queries"))
    weights = layer.trainable_weights
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(q)
            loss = loss_fn(layer(q, **inputs))
        grads = tape.gradient(loss, [q] + [w.value for w in weights])
    elif BACKEND == "jax":
        import jax

        def loss_of(q, values):
            out = layer.stateless_call(
                values, [w.value for w in layer.non_trainable_variables], q, **inputs
            )[0]
            return loss_fn(out)

        gq, gw = jax.grad(loss_of, argnums=(0, 1))(q, [w.value for w in weights])
        grads = [gq] + list(gw)
    else:
        q.requires_grad_(True)
        for w in weights:
            w.value.grad = None
        loss_fn(layer(q, **inputs)).backward()
        grads = [q.grad] + [w.value.grad for w in weights]
    return [to_numpy(g) for g in grads]
