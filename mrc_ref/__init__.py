"""mrc_ref: reference implementation of activation-aware mixed-rank
compression of Vision Transformers (arXiv 2402.06004).

Modules: ``stats``, ``svd`` (Stage 1), ``allocate`` (Stage 2),
``compensate`` and ``sequential`` (Stage 3), ``pipeline`` (the stages in
order), ``formats`` (files), ``vit`` (forward pass), ``metrics``, ``backend``
(NumPy/CuPy), ``errors``. Command lines: ``python -m mrc_ref.compress`` and
``python -m mrc_ref.evaluate``.
"""

__version__ = "0.1.0"
