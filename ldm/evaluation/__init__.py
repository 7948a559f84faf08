"""Sample-quality metrics (torch-only: no Lightning, no sampling; it scores the images it is given).

features.py     FeatureExtractor protocol, registry (inception | tiny), batched ``extract``
inception.py    the standard 2048-d Inception-v3 FID network (offline weights, sha1-checked) + preprocessing
metrics.py      Fréchet distance (FID) and polynomial-kernel MMD (KID) in float64
reference.py    reference statistics of real images, cached as .npz with their identity
clip_score.py   CLIP score with any transformers CLIPModel (local dir or hub id)
results.py      eval.json / eval.csv records (resumable) and the PNG plots
"""

from ldm.evaluation.clip_score import ClipScorer
from ldm.evaluation.features import EXTRACTORS, FeatureExtractor, TinyFeatures, build_extractor, extract
from ldm.evaluation.inception import InceptionV3Features, inception_weights_path
from ldm.evaluation.metrics import GaussianStats, frechet_distance, gaussian_stats, kernel_distance
from ldm.evaluation.reference import ReferenceStats, compute_reference, load_or_compute, load_reference

__all__ = [
    "EXTRACTORS",
    "ClipScorer",
    "FeatureExtractor",
    "GaussianStats",
    "InceptionV3Features",
    "ReferenceStats",
    "TinyFeatures",
    "build_extractor",
    "compute_reference",
    "extract",
    "frechet_distance",
    "gaussian_stats",
    "inception_weights_path",
    "kernel_distance",
    "load_or_compute",
    "load_reference",
]
