"""Merge kernels: pure tensor functions, one output tensor per call, no name parsing, no I/O.

Every kernel has the signature (see docs/ARCHITECTURE.md)::

    fn(base, tensors, model_params, params, options, generator) -> Tensor

``base`` is the base model's tensor (None for methods without a base), ``tensors`` the input models'
tensors in recipe order (base excluded for methods that need one), ``model_params[i]`` the resolved
numeric per-model values for ``tensors[i]`` (weight, density, gamma...), ``params`` the resolved global
values (lambda, t...), ``options`` the behaviour switches (defaults below apply to missing keys) and
``generator`` a seeded ``torch.Generator`` for random methods (DARE).

Common options, read by every kernel:
- ``compute_dtype``: torch dtype (or its name) to compute in; default float32, float64 when inputs are.
- ``inputs_are_deltas``: ``tensors`` already hold task vectors ``theta_t - base`` (the resident merger
  keeps those); the result is still a full tensor.

Kernels never modify their inputs and return a new tensor in the compute dtype; the caller casts.
Semantics follow mergekit 0.1.5 unless an option says otherwise (see each docstring).
"""

