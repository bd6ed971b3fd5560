"""Sample-quality metrics: FID, KID, improved precision/recall, and a digit-classifier judge.

Every metric returns a dict that names its value(s), the number of generated (``*_n``) and reference
(``*_ref_n``) samples used, and the feature extractor (``features``), so numbers from different runs
are only compared when they were measured the same way.
"""

from ldm.metrics.classifier import (
    DigitJudge,
    JudgeArch,
    JudgeTrainConfig,
    conditional_accuracy,
    conditional_accuracy_report,
    judge_cache_key,
    load_or_train_judge,
    train_judge,
)
from ldm.metrics.features import (
    FeatureExtractor,
    InceptionFeatures,
    JudgeFeatures,
    reference_features,
    to_uint8_nhwc,
)
from ldm.metrics.fid import (
    FeatureStats,
    fid_from_features,
    fid_from_stats,
    fid_torchmetrics,
    frechet_distance,
    reference_stats,
)
from ldm.metrics.kid import kid_from_features, kid_torchmetrics, mmd2_unbiased
from ldm.metrics.precision_recall import manifold_radii, precision_recall

__all__ = [
    "DigitJudge",
    "FeatureExtractor",
    "FeatureStats",
    "InceptionFeatures",
    "JudgeArch",
    "JudgeFeatures",
    "JudgeTrainConfig",
    "conditional_accuracy",
    "conditional_accuracy_report",
    "fid_from_features",
    "fid_from_stats",
    "fid_torchmetrics",
    "frechet_distance",
    "judge_cache_key",
    "kid_from_features",
    "kid_torchmetrics",
    "load_or_train_judge",
    "manifold_radii",
    "mmd2_unbiased",
    "precision_recall",
    "reference_features",
    "reference_stats",
    "to_uint8_nhwc",
    "train_judge",
]
