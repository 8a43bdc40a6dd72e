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
    of_inputs, of_weights = input_and_weight_gradients(layer, loss_fn, inputs)
    return [of_inputs["content_queries"]] + of_weights


def input_and_weight_gradients(layer, loss_fn, inputs, wrt=("content_queries",),
                               compiled=False, torch_backend="aot_eager"):
    """Gradients of `loss_fn(layer(**inputs))` w.r.t. the inputs named in
    `wrt` (a dict by name) and each trainable weight (a list), as numpy
    arrays (zeros where the loss does not depend on it), on any backend.
    `compiled`: under `jax.jit`, `tf.function(jit_compile=True)` or
    `torch.compile` (with `torch_backend`: "aot_eager" traces as inductor does,
    dynamo and AOT autograd, and runs the graph eagerly, seconds instead of a
    minute of code generation; "inductor" for the real thing); the other
    inputs stay NumPy constants of that call."""
    fixed = {k: v for k, v in inputs.items() if k not in wrt}
    xs = [keras.ops.convert_to_tensor(inputs[k]) for k in wrt]
    weights = layer.trainable_weights
    if BACKEND == "tensorflow":
        import tensorflow as tf

        def step(*xs):
            with tf.GradientTape() as tape:
                tape.watch(xs)
                loss = loss_fn(layer(**fixed, **dict(zip(wrt, xs))))
            return tape.gradient(loss, list(xs) + [w.value for w in weights])

        grads = (tf.function(step, jit_compile=True) if compiled else step)(*xs)
    elif BACKEND == "jax":
        import jax

        def loss_of(xs, trainable, non_trainable):
            out = layer.stateless_call(
                trainable, non_trainable, **fixed, **dict(zip(wrt, xs))
            )[0]
            return loss_fn(out)

        grad = jax.grad(loss_of, argnums=(0, 1))
        gx, gw = (jax.jit(grad) if compiled else grad)(
            xs, [w.value for w in weights], [w.value for w in layer.non_trainable_variables]
        )
        grads = list(gx) + list(gw)
    else:
        import torch

        for x in xs:
            x.requires_grad_(True)
        for w in weights:
            w.value.grad = None

        def loss_of(*xs):
            return loss_fn(layer(**fixed, **dict(zip(wrt, xs))))

        (torch.compile(loss_of, backend=torch_backend) if compiled else loss_of)(*xs).backward()
        grads = [x.grad for x in xs] + [w.value.grad for w in weights]
    targets = xs + [w.value for w in weights]
    grads = [
        np.zeros(tuple(t.shape), "float32") if g is None else to_numpy(g)
        for g, t in zip(grads, targets)
    ]
    return dict(zip(wrt, grads[: len(wrt)])), grads[len(wrt):]
