"""The quantization workbench (issue 6): power-of-two, fixed-point and LSQ quantizers, data-free sweeps, fixed-point
intrinsic/extrinsic sweeps, FAT vs LSQ vs PTQ, per-layer sensitivity, bit-efficiency statistics and the QAT-survey
memory model. Entry point: ``experiments/sweep.py``; summary in ``docs/workbench.md``."""
