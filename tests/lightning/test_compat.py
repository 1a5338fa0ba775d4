"""The Lightning private attributes behind gradwatch.lightning._compat exist in a real fit."""

from __future__ import annotations

import pytest
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from gradwatch.lightning import _compat
from tests.helpers.lightning_models import Classifier, loader, trainer
from tests.helpers.torch_zoo import MLP


class Probe(Callback):
    def __init__(self):
        self.seen = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        loop = trainer.fit_loop.epoch_loop
        assert hasattr(loop, "_batches_that_stepped"), (
            "Lightning moved _batches_that_stepped: update lightning/_compat.py"
        )
        self.seen.append(_compat.optimizer_step(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        connector = trainer._logger_connector
        assert isinstance(getattr(connector, "_callback_metrics", None), dict), (
            "Lightning moved _logger_connector._callback_metrics: update lightning/_compat.py"
        )
        _compat.callback_metrics(trainer)["probe"] = 1.0


def test_private_attributes_are_there_and_mean_what_gradwatch_reads(tmp_path):
    probe = Probe()
    logger = TensorBoardLogger(tmp_path)
    t = trainer(callbacks=[probe], logger=logger, max_steps=4)
    t.fit(Classifier(MLP()), loader())
    assert probe.seen == [0, 1, 2, 3]  # the 0-based step Lightning's loggers use
    assert "probe" in t.callback_metrics  # written through, visible through the public property
    writer = _compat.tensorboard_file_writer(logger.experiment)
    assert writer is not None and hasattr(writer, "add_summary")


def test_file_writer_of_something_else_is_none():
    assert _compat.tensorboard_file_writer(object()) is None


def test_uncompile_copy_binds_the_eager_methods_to_the_copy():
    import copy

    import torch
    from lightning.pytorch.utilities.compile import from_compiled

    module = from_compiled(torch.compile(Classifier(MLP()), backend="eager"))
    assert isinstance(module._compiler_ctx, dict), (
        "Lightning moved _compiler_ctx: update _compat.py"
    )
    twin = copy.deepcopy(module)
    assert _compat.uncompile_copy(twin)
    assert twin.training_step.__self__ is twin and twin.forward.__self__ is twin
    assert twin._compiler_ctx is None and isinstance(module._compiler_ctx, dict)
    assert not _compat.uncompile_copy(twin)


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
