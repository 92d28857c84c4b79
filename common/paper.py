"""The values the method was published with (Yang et al. 2020), defined once.

Each is a default, not a law: a checkpoint records the input size, lung window, threshold and
trim fraction its weights go with, and ``HRCT_THRESHOLD`` / ``HRCT_TRIM_FRACTION``, set
explicitly, override the checkpoint's two decision values (``worker.method.decision``). Here,
in ``common``, because the settings take their defaults from it too.
"""

from __future__ import annotations

LUNG_WINDOW_WIDTH = 1200.0  # HU: the lung window maps [-1200, 0] HU to [0, 1]
LUNG_WINDOW_LEVEL = -600.0  # HU
INPUT_SIZE = 224  # pixels a side: DenseNet-121's ImageNet input size
THRESHOLD = 0.8  # a study is positive when its probability is at or above this
TRIM_FRACTION = 0.1  # share of the lung slices dropped at each end before the mean
