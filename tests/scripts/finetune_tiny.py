"""A tiny FAT run (random LeNet-5, 21 steps, checkpoint every 2 steps): ``finetune_tiny.py WORKDIR [resume]``.
Prints the best thresholds as JSON on its last line. Used by tests/test_resume.py, which kills it."""
import sys, numpy as np, jax, ml_collections, json
import fatq
from fatq import training
from fatq.models import LeNet5
qcfg = fatq.QuantConfig.uniform(fatq.QuantSpec.fat(4, per_channel=True), fatq.QuantSpec.fat(4, symmetric=False))
m = LeNet5(quant=qcfg)
x = np.asarray(jax.random.uniform(jax.random.key(0), (200, 28, 28, 1)))
params = m.init(jax.random.key(1), x)["params"]
stats = fatq.calibrate(m, params, [x[:50]])
th = fatq.init_thresholds(m, params, stats, x[:1])
teacher = np.asarray(m.clone(quant=None).apply({"params": params}, x))
cfg = ml_collections.ConfigDict(dict(epochs=3, batch_size=20, loss="rmse", schedule="cosine_restarts", lr=1e-2, lr_min=0.0, restart_period=10, eval_every=5, seed=0, checkpoint_every=2))
best, hist = training.finetune(m, {"params": params, "quant_stats": stats}, th, x[:150], teacher[:150], (x[150:], teacher[150:]), cfg, workdir=sys.argv[1], resume=len(sys.argv) > 2, progress=False)
print(json.dumps(dict(best=jax.tree.map(lambda a: np.asarray(a).tolist(), fatq.points(best)), history=hist)))
