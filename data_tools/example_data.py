"""The embedded example's paths, kept under their old names.

The files are package data of the core, in ``mrc_ref/example/`` (see
:mod:`mrc_ref.example`): the core's commands need them, and ``data_tools``
uses ``mrc_ref``, never the reverse.
"""

from mrc_ref.example import (  # noqa: F401  (re-exported)
    ACTS,
    CALIB_IMAGES,
    EXAMPLE_DIR,
    TEST_IMAGES,
    WEIGHTS,
    example_paths,
    accuracy_line,
)
