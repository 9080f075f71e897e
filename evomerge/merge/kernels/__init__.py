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

Streaming kernels (the generalized task arithmetic family: task arithmetic, TIES, DARE, Breadcrumbs; their
registry entries say ``streams``) also take :class:`~evomerge.merge.kernels.pieces.Source` inputs read piece
by piece and an ``out=`` buffer they write (any float dtype), and hold only piece-sized temporaries:
- ``memory_budget``: bytes those temporaries may take (default 256 MiB; CPU pieces stay cache-sized);
- ``piece_elems`` / ``part_elems``: force the piece / smallest part size (tests, tuning); results never
  depend on them;
- ``cpu_share`` / ``kernel_threads``: a :class:`~evomerge.merge.kernels.pieces.CpuShare` and a thread count
  with which a large tensor's parts are walked on idle cores.
Selection primitives for new methods (top-k, percentiles, rank windows, per-row ranks) are in
:mod:`evomerge.merge.kernels.sparsify`.
"""

