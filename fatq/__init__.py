"""fatq: learned-threshold (FAT) quantization-aware fine-tuning for JAX/Flax image classifiers.

Public API::

    config = fatq.QuantConfig.uniform(weight=fatq.QuantSpec.fat(8, per_channel=True),
                                      activation=fatq.QuantSpec.fat(8, symmetric=False))
    model = LeNet5(quant=config)
    stats = fatq.calibrate(model, params, batches)                 # quant_stats collection
    config.check_matches(fatq.point_names(model, x))              # every rule applies somewhere (typos)
    thresholds = fatq.init_thresholds(model, params, stats, x)     # quant collection (trainable)
    thresholds, history = fatq.finetune(model, {'params': params, 'quant_stats': stats}, thresholds, ...)

Data-free quantization before calibration (module ``fatq.equalize``)::

    params, report = fatq.equalize.equalize(model, params, image_shape)      # cross-layer equalization
    params, corrections = fatq.equalize.correct_bias(qmodel, params, batches)  # empirical bias correction
"""

from fatq import equalize
from fatq.calibration import calibrate, init_thresholds, point_names, points, quant_ranges
from fatq.config import PAPER_BOUNDS, REFERENCE_BOUNDS, QuantConfig, QuantRule, QuantSpec
from fatq.folding import fold_batch_norm
from fatq.layers import RANGES, STATS, THRESHOLDS, FakeQuant, QConv, QDense, quant_point
from fatq.quantizers import fake_quant, nudge, quantize_bias
from fatq.training import finetune, predict

__all__ = [
    "PAPER_BOUNDS", "REFERENCE_BOUNDS", "QuantConfig", "QuantRule", "QuantSpec", "FakeQuant", "QConv", "QDense",
    "quant_point", "STATS", "THRESHOLDS", "RANGES", "calibrate", "init_thresholds", "quant_ranges", "points",
    "point_names", "fold_batch_norm", "fake_quant", "nudge", "quantize_bias", "finetune", "predict", "equalize",
]
