"""Call arguments given by position, as edspdf's `forward` takes them."""


class KeywordCallArguments:
    """A layer mixin: every call argument after the first reaches Keras by
    keyword.

    When a call has exactly one tensor argument, Keras' `Layer.__call__`
    fills `mask=` by keyword from that tensor's Keras mask. A `mask` that
    was given by position (`layer(q, k, None, None, positions)` with NumPy
    `q` and `k`, or `layer(x, None)`) then reaches `call` twice, and Python
    raises "got multiple values for argument 'mask'". Named, the argument is
    seen as given, and the Keras masks of the inputs still fill the
    `<argument>_mask` parameters as before.
    """

    def __call__(self, *args, **kwargs):
        if len(args) > 1:
            names = list(self._call_signature.parameters)
            if len(args) > len(names):
                raise TypeError(
                    f"{type(self).__name__}.call() takes at most {len(names)} "
                    f"arguments ({', '.join(names)}), got {len(args)} by position."
                )
            for name, value in zip(names[1:], args[1:]):
                if name in kwargs:
                    raise TypeError(
                        f"{type(self).__name__}.call() got multiple values for "
                        f"argument {name!r} (by position and by keyword)."
                    )
                kwargs[name] = value
            args = args[:1]
        return super().__call__(*args, **kwargs)
