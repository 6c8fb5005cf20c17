"""Image folders and the DeiT evaluation transform: :mod:`mrc_ref.images`.

The code moved into the core, which needs it to evaluate (``data_tools``
uses ``mrc_ref``, never the reverse). This name is the same module object,
so ``data_tools.images.X`` and ``mrc_ref.images.X`` are one attribute
(setting ``MAX_PIXELS`` on either changes both).
"""

import sys

from mrc_ref import images as _images

sys.modules[__name__] = _images
