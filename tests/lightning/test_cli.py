"""GradWatch configured from a LightningCLI YAML file."""

from __future__ import annotations

import pytest

pytest.importorskip("jsonargparse")

from lightning.pytorch.cli import LightningCLI

from gradwatch.lightning import GradWatch
from tests.helpers.lightning_models import Classifier, loader
from tests.helpers.torch_zoo import MLP

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


class CLIModule(Classifier):
    def __init__(self, lr: float = 0.05):
        super().__init__(MLP(), lr=lr)

    def train_dataloader(self):
        return loader()


def test_gradwatch_from_yaml(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        """
trainer:
  max_steps: 4
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  accelerator: cpu
  callbacks:
    - class_path: gradwatch.lightning.GradWatch
      init_args:
        check_every_n_steps: 2
        num_params: 8
        on_explode: halt
        include: ["fc1", "out"]
"""
    )
    cli = LightningCLI(CLIModule, args=["fit", "--config", str(config)], save_config_callback=None)
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, GradWatch)]
    assert cb.config.check_every_n_steps == 2 and cb.config.on_explode == "halt"
    assert cb.config.include == ("fc1", "out")
    assert [r.step for r in cb.reports] == [0, 2]
    assert {p.split(".")[1] for r in cb.reports for p in r.params} == {"fc1", "out"}


def test_a_wrong_policy_fails_when_the_config_is_parsed(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(
        """
trainer:
  callbacks:
    - class_path: gradwatch.lightning.GradWatch
      init_args:
        on_explode: stop
"""
    )
    with pytest.raises(SystemExit) as info:
        LightningCLI(CLIModule, args=["--config", str(config), "--print_config"], run=False)
    assert info.value.code != 0
    assert "on_explode" in capsys.readouterr().err


def test_help_lists_the_choices(capsys):
    with pytest.raises(SystemExit):
        LightningCLI(
            CLIModule,
            args=["fit", "--trainer.callbacks.help", "GradWatch"],
            save_config_callback=None,
        )
    out = capsys.readouterr().out
    assert "{ignore,warn,halt,raise}" in out
    assert "{coordinate,directional,modules}" in out
    assert "Optional[Literal['float64', 'float32']]" in out
