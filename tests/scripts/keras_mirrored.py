"""MirroredStrategy with two logical CPU devices (process-wide setting: run in a subprocess).

Usage: python tests/scripts/keras_mirrored.py OUT.json
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras  # noqa: E402

from gradwatch.keras import GradWatch, check_gradients  # noqa: E402
from tests.helpers import keras_models as km  # noqa: E402

x, y = km.data("mlp", n=64)
keras.utils.set_random_seed(0)
plain = km.mlp()
r_plain = check_gradients(plain, x, y)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    keras.utils.set_random_seed(0)
    model = km.mlp()
r_mirror = check_gradients(model, x, y)
jsonl = Path(sys.argv[1]).with_suffix(".jsonl")
cb = GradWatch(
    check_every_n_steps=2, data=(x[:16], y[:16]), jsonl_path=str(jsonl), log_every_n_steps=1
)
hist = model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
Path(sys.argv[1]).write_text(
    json.dumps(
        {
            "plain": r_plain.verdict,
            "mirror": r_mirror.verdict,
            "same_entries": [e.index for e in r_plain.results]
            == [e.index for e in r_mirror.results],
            "rel": [r_plain.max_rel_error, r_mirror.max_rel_error],
            "callback": [r.verdict for r in cb.reports],
            "events": [e.kind for e in cb.events],
            "norms": [float(v) for v in hist.history.get("gradwatch_grad_norm", [])],
            "norm_steps": [
                r["step"]
                for r in map(json.loads, jsonl.read_text().splitlines())
                if r["type"] == "norms"
            ],
        }
    )
)
