"""LeNet-5 on MNIST: float training, post-training quantization (ptq-lenet5.txt) and FAT at 8/4/3 bits.

    python experiments/finetune.py --config configs/lenet5_mnist.py --workdir runs/lenet5_mnist

Override any value on the command line, e.g. ``--config.fat.epochs=2``; ``configs/lenet5_mnist.py:quick`` is a
one-minute smoke run (1 float epoch, 3000 FAT images, two rows); ``:actmse`` runs the FAT rows below 8 bits twice,
activation ranges by min/max and by MSE (``act_calibration='mse'``), ``:actpercentile`` once more, with activation
ranges that keep 99.99 % of the values (``act_calibration='percentile'``), ``:actentropy`` with ranges of least KL
divergence (``act_calibration='entropy'``). Data: ``$FATQ_DATA/mnist`` (default
``../shared/data/mnist``) or ``--config.data.dir=/path/to/idx/files``.
"""

import ml_collections


# Below 8 bits the logits stay at 8 bits, as the input image does (the last rows keep the whole first and last layers
# at 8 bits, the usual convention for low-bit rows). 16 logit levels tie the top classes: with 4-bit logits FAT
# W4A4 loses a further 1.0 point of Fashion-MNIST top-1 (docs/results.md).
LOGITS_AT_8_BITS = [("fc3/output", dict(bits=8, symmetric=False))]


def ends_at_8_bits(per_channel: bool):
  """The usual convention for low-bit rows: the first and last layers at 8 bits (conv1's weights; fc3's weights and
  its input, fc2/output; the image and the logits are 8-bit already)."""
  return [("conv1/kernel", dict(bits=8, per_channel=per_channel)),
          ("fc3/kernel", dict(bits=8, per_channel=per_channel)),
          ("fc2/output", dict(bits=8, symmetric=False))]


def rows():
  """The table: ptq-lenet5.txt's settings (per-layer symmetric weights, asymmetric activations, min/max
  calibration), then FAT at 8, 4 and 3 bits in scalar ("tensor") and vector ("channel") mode, W4A4 again with
  empirical bias correction of the quantized weights before calibration (fatq.equalize.correct_bias), and W4A4 with
  the first and last layers at 8 bits, the 4-bit weights' ranges clipped for least squared error
  (``weight_calibration='mse'``), bias correction and learned bias offsets (``learn_biases``: FAT trains an offset
  per bias beside the thresholds)."""
  ptq_paper = [dict(weight_bits=b, act_bits=0) for b in (16, 8)] + [
      dict(weight_bits=16, act_bits=16, act_symmetric=False)]  # W8A8 PTQ is the first row of the FAT rows
  fat = []
  for b in (8, 4, 3):
    for pc in (False, True):
      row = dict(weight_bits=b, act_bits=b, per_channel=pc, act_symmetric=False, fat=True)
      if b < 8:
        row.update(rules=LOGITS_AT_8_BITS, name=f"W{b}A{b}-{'channel' if pc else 'tensor'}-symW-asymA-logits8")
      fat.append(row)
  w4a4 = [r for r in fat if r["weight_bits"] == 4]
  fat += [dict(r, bias_correction=True, name=r["name"] + "-bc") for r in w4a4]
  fat += [dict(r, bias_correction=True, learn_biases=True, weight_calibration="mse",
               rules=r["rules"] + ends_at_8_bits(r["per_channel"]),
               name=r["name"].replace("-logits8", "-ends8-mse-bc-learnbias")) for r in w4a4]
  return ptq_paper + fat


def get_config(arg: str | None = None, dataset: str = "mnist"):
  if arg not in (None, "", "quick", "actmse", "actpercentile", "actentropy"):
    raise ValueError(f"unknown config variant {arg!r}; use '', 'quick', 'actmse', 'actpercentile' or 'actentropy'")
  c = ml_collections.ConfigDict()
  c.seed = 0
  # AdamW's weight decay makes a float model that loses less at low bits: on Fashion-MNIST, 0.05 gave float 90.84
  # (90.74 without) and FAT W4A4 per channel 88.97 (87.90 without), both with 4-bit logits.
  c.model = dict(name="lenet5", num_classes=10, checkpoint="", float_epochs=8 if dataset == "mnist" else 15,
                 float_batch_size=128, float_lr=1e-3, float_weight_decay=0.05)
  # Images for FAT (unlabeled), calibration and the held-out distillation loss come from the training split.
  c.data = dict(name=dataset, dir="", num_train=10000, num_calibration=100, num_holdout=1000)
  c.calibration = dict(batch_size=100)
  c.input_bits = 8  # the image is 8-bit data: quantize it at 8 bits in every row
  c.fat = dict(epochs=4, batch_size=100, loss="rmse", schedule="cosine_restarts", lr=5e-3, lr_min=0.0,
               restart_period=100, eval_every=50, checkpoint_every=0, seed=0, per_device_batch_size=0,
               # True: clip the factors back into their bounds after each step (projected gradient descent); False,
               # the paper's way, leaves a factor that a step carried past a bound there, without gradient
               project_factors=False)
  c.rows = rows()
  c.eval_batch_size = 1000
  low = [r for r in c.rows if r.get("fat") and r["weight_bits"] < 8]
  if arg == "actmse":
    c.rows = [r for row in low for r in (row, dict(row, act_calibration="mse", name=row["name"] + "-actmse"))]
  if arg == "actpercentile":
    c.rows = [dict(row, act_calibration="percentile", name=row["name"] + "-actp99.99") for row in low]
  if arg == "actentropy":
    c.rows = [dict(row, act_calibration="entropy", name=row["name"] + "-actentropy") for row in low]
  if arg == "quick":
    c.model.float_epochs = 1
    c.data.num_train, c.data.num_holdout = 3000, 300
    c.fat.update(epochs=3, eval_every=15, restart_period=30)
    c.rows = [dict(weight_bits=8, act_bits=8, act_symmetric=False),
              dict(weight_bits=3, act_bits=3, per_channel=True, act_symmetric=False, fat=True)]
  return c
