"""Evaluation tools: FID / Inception Score / precision-recall with user-provided
Inception-v3 weights (``iddpm fid``). Bits/dim is ``GaussianDiffusion.calc_bpd_loop``."""

from .fid import (  # noqa: F401
    evaluate,
    feature_statistics,
    frechet_distance,
    inception_score,
    load_npz_images,
    precision_recall,
)
from .inception import InceptionV3, load_inception  # noqa: F401
