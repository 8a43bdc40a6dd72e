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


class EdspdfGradients:
    """Our weights' gradients under edspdf's parameter names (see
    `edspdf_named_gradients`).

    Attributes:
        trainable: edspdf name -> the gradient of the trainable weight that
            name holds (laid out as edspdf's tensor); shared projections
            under both of their names.
        frozen: the names that hold a non-trainable weight (say the table as
            a buffer).
        unused: the names our layer has no weight for (a position projection
            no term reads, exported as zeros).
    """

    def __init__(self, trainable, frozen, unused):
        self.trainable, self.frozen, self.unused = trainable, frozen, unused


def edspdf_named_gradients(layer, weight_gradients):
    """`weight_gradients` (one per `layer.trainable_weights`, as
    `input_and_weight_gradients` returns them) under edspdf's names, by the
    public `keras_relattn.edspdf_state_dict`: with the trainable weights set
    to their gradients, the state dict is the gradients (its layouts are
    reshapes and transposes: linear, so a gradient maps exactly as its
    weight). Which name holds which kind of weight is found the same way:
    a name whose tensor changes when only the trainable (or only the
    non-trainable) weights change holds one. The weights are restored."""
    from keras_relattn import edspdf_state_dict

    trainable = list(layer.trainable_weights)
    frozen = [w for w in layer.non_trainable_weights if "float" in str(w.dtype)]
    assert len(weight_gradients) == len(trainable)
    saved = [to_numpy(w) for w in trainable + frozen]

    def state(trainable_values, frozen_values):
        for w, value in zip(trainable + frozen, list(trainable_values) + list(frozen_values)):
            w.assign(np.asarray(value).astype(w.dtype))
        return edspdf_state_dict(layer)

    def fill(weights, value):
        return [np.full(tuple(w.shape), value, "float32") for w in weights]

    try:
        zeros = state(fill(trainable, 0), fill(frozen, 0))
        trainable_ones = state(fill(trainable, 1), fill(frozen, 0))
        frozen_ones = state(fill(trainable, 0), fill(frozen, 1))
        grads = state(weight_gradients, fill(frozen, 0))
    finally:
        for w, value in zip(trainable + frozen, saved):
            w.assign(value)

    def changed(ones):
        return {name for name in zeros if not np.array_equal(ones[name], zeros[name])}

    trainable_names, frozen_names = changed(trainable_ones), changed(frozen_ones)
    assert not trainable_names & frozen_names, trainable_names & frozen_names
    return EdspdfGradients(
        {name: grads[name] for name in trainable_names}, frozen_names,
        set(zeros) - trainable_names - frozen_names,
    )
