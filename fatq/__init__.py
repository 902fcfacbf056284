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

import importlib
import importlib.util

# The public names and the modules that define them, imported on first use (PEP 562): the entry points import
# fatq.cli, which checks the command line (and restarts the process with malloc tuned) before JAX is imported.
_API = {
    "fatq.calibration": ["calibrate", "init_thresholds", "point_names", "points", "quant_ranges"],
    "fatq.config": ["PAPER_BOUNDS", "REFERENCE_BOUNDS", "QuantConfig", "QuantRule", "QuantSpec"],
    "fatq.folding": ["fold_batch_norm"],
    "fatq.layers": ["RANGES", "STATS", "THRESHOLDS", "FakeQuant", "QConv", "QDense", "quant_point"],
    "fatq.quantizers": ["fake_quant", "nudge", "quantize_bias"],
    "fatq.training": ["finetune", "predict"],
}
_MODULE_OF = {name: module for module, names in _API.items() for name in names}

__all__ = [*_MODULE_OF, "equalize"]


def __getattr__(name: str):
  if name in _MODULE_OF:
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
  elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule: fatq.equalize, fatq.layers, ...
    value = importlib.import_module(f"{__name__}.{name}")
  else:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  globals()[name] = value  # looked up once
  return value


def __dir__():
  return sorted({*globals(), *__all__})
