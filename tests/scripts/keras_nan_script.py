"""A Keras fit with one NaN batch, for tests/keras/test_onednn.py (run with TF_ENABLE_ONEDNN_OPTS
set either way: oneDNN's ReLU maps NaN to 0, so the loss may stay finite while gradients are NaN).

Usage: python tests/scripts/keras_nan_script.py OUT.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np

from gradwatch.keras import GradWatch
from tests.helpers import keras_models as km


def main() -> None:
    keras.utils.set_random_seed(0)
    model = km.mlp()
    x, y = km.data("mlp", n=16 * 40)
    x[16 * 5 : 16 * 6] = np.nan  # the 6th batch
    cb = GradWatch(enable_checks=False)
    history = model.fit(x, y, batch_size=16, epochs=1, shuffle=False, callbacks=[cb], verbose=0)
    out = {
        "events": [(e.kind, e.step) for e in cb.events],
        "finite": all(bool(np.isfinite(v.numpy()).all()) for v in model.variables),
        "iterations": int(model.optimizer.iterations),
        "loss_finite": bool(np.isfinite(history.history["loss"]).all()),
    }
    Path(sys.argv[1]).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
