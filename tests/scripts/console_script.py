"""A short Lightning run as a user would write it, for the console tests (run in a subprocess).

``python -m tests.scripts.console_script bug``: a planted backward bug checked at several steps;
``... halt``: a batch that makes the gradients NaN, halted by the default ``on_nonfinite``.
"""

from __future__ import annotations

import sys

import torch
from torch.nn import functional as F

from gradwatch.lightning import GradWatch
from tests.helpers.lightning_models import Classifier, buggy_net, loader, trainer
from tests.helpers.torch_zoo import MLP

BAD_BATCH = 3


class Standardised(Classifier):
    """Per-batch standardisation: a batch whose rows are all equal divides 0 by 0."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net((x - x.mean(0)) / x.std(0)), y)


def constant_batch_loader(batch_size=16, n=128):
    xs, ys = [], []
    for i, (x, y) in enumerate(loader(n=n, batch_size=batch_size)):
        xs.append(x[:1].expand_as(x).clone() if i == BAD_BATCH else x)
        ys.append(y)
    dataset = torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size)


def main(what: str) -> None:
    if what == "bug":
        module = Classifier(buggy_net(scale=0.5))
        callback = GradWatch(check_every_n_steps=2, num_params=16)
        trainer(callbacks=[callback], max_steps=6).fit(module, loader())
    else:
        module = Standardised(MLP(), optimizer="adam", lr=0.01)
        callback = GradWatch(enable_checks=False)
        trainer(callbacks=[callback], max_epochs=3).fit(module, constant_batch_loader())
    print(f"events: {[(e.kind, e.step) for e in callback.events]}")


if __name__ == "__main__":
    main(sys.argv[1])
