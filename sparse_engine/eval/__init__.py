"""Evaluation beyond test accuracy: calibration, per-class accuracy, agreement with and distance to
the dense parent, accuracy under input noise and under common corruptions."""
from sparse_engine.eval.compare import FASHION_MNIST_NORMALIZATION, compare_models, model_metrics
from sparse_engine.eval.corruptions import (CORRUPTIONS, NOISE_LEVELS, SEVERITIES, corrupt, gaussian_blur, pixelate,
                                            uniform_noise)
from sparse_engine.eval.metrics import (agreement, calibration_errors, class_accuracies, output_distances,
                                        worst_class_accuracy)

__all__ = [
    "compare_models", "model_metrics", "FASHION_MNIST_NORMALIZATION",
    "calibration_errors", "class_accuracies", "worst_class_accuracy", "agreement", "output_distances",
    "corrupt", "uniform_noise", "gaussian_blur", "pixelate", "CORRUPTIONS", "NOISE_LEVELS", "SEVERITIES",
]
