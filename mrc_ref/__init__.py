"""mrc_ref: reference implementation of activation-aware mixed-rank
compression of Vision Transformers (arXiv 2402.06004).

The public modules, in three layers (docs/architecture.md); a layer imports
only the layers above it in this list.

1. Math over an array module ``xp`` (NumPy, CuPy), no files:
   ``stats`` (statistics, their validation and metrics), ``svd`` (Stage 1),
   ``allocate`` (Stage 2), ``compensate`` and ``sequential`` (Stage 3),
   ``pipeline`` (the stages in order, ``Config``), ``vit`` (the forward
   pass), ``threads`` (its worker threads, BLAS at one thread), ``layout`` (the compressed layer's keys and rule), ``quantize``
   (int8), ``sensitivity`` (weights of the calibrated objective),
   ``certificates`` (optimality certificates by an independent route),
   ``metrics`` (over logits), ``backend`` (the ``xp`` switch) and
   ``errors`` (user errors by type).
2. Files and file-level drivers: ``formats`` (one reader and writer per file
   kind), ``images`` (image folders, the DeiT eval transform), ``compress``,
   ``evaluate``, ``verify``, ``report`` and ``export`` (the ONNX export;
   needs the onnx extra) (what the commands do, as functions), ``testing``
   and ``cases`` (the golden-reference kit),
   ``example`` (the embedded model) and ``progress`` (progress bars).
3. Command lines, ``python -m mrc_ref.compress`` and the others: each
   package's ``__main__``, sharing ``cli``.
"""

__version__ = "0.1.0"
