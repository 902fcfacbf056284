"""FAT vs LSQ vs PTQ at W4A4 and W3A3 on LeNet-5 MNIST and at W4A8 on MobileNet v1 0.75 (ImageNet validation
images; the unlabeled pool for calibration and training). Weights per channel, activations per tensor; the image
input at 8 bits. FAT and LSQ share the training loop (Adam, cosine restarts, best held-out distillation loss); LSQ
learns its step sizes (gradient scale 1/sqrt(N Q_p)) by distillation, or from labels with ``lsq_labels=True``.

    python experiments/sweep.py --config configs/workbench_lsq.py --workdir runs/workbench_lsq
"""

import ml_collections


def get_config(arg=None):
  if arg not in (None, '', 'quick'):
    raise ValueError(f"unknown config variant {arg!r}; use '', 'quick'")
  c = ml_collections.ConfigDict()
  c.experiment = "lsq"
  c.seed = 0
  c.methods = ("ptq", "fat", "lsq")
  c.tasks = [
      dict(model="lenet5", dataset="mnist", float_epochs=3, num_train=10000, num_holdout=1000, num_eval=10000,
           settings=((4, 4), (3, 3)), per_channel=True, eval_batch_size=500, train={}),
      dict(model="mobilenet_v1_0.75", num_train=256, num_calibration=100, num_holdout=48, num_eval=200,
           settings=((4, 8),), per_channel=True, impl="fast", eval_batch_size=50,
           train=dict(batch_size=16, epochs=2, restart_period=20, eval_every=10)),
  ]
  c.train = dict(epochs=2, batch_size=100, loss="rmse", schedule="cosine_restarts", lr=5e-3, lr_min=0.0,
                 restart_period=100, eval_every=50, seed=0, checkpoint_every=0)
  c.lsq_train = dict(lr=1e-3)  # LSQ steps are absolute sizes (FAT factors are ~1): a smaller Adam rate
  c.lsq_labels = False  # distillation by default
  if arg == "quick":
    c.tasks = [dict(model="lenet5", dataset="mnist", float_epochs=1, float_limit=2000, num_train=400,
                    num_holdout=100, num_eval=300, settings=((4, 4),), per_channel=True, eval_batch_size=100,
                    train={})]
    c.train.update(epochs=1, eval_every=2, restart_period=4)
  return c
