"""The torch private attributes behind gradwatch.torch._compat exist and mean what we read."""

from __future__ import annotations

import torch
from torch import nn

from gradwatch.torch import _compat


def test_compiled_original_is_the_eager_module():
    eager = nn.Linear(2, 2)
    compiled = torch.compile(eager, backend="eager")
    assert _compat.compiled_original(compiled) is eager
    assert _compat.compiled_original(eager) is None


def test_foreach_norm_is_the_l2_norm_of_each_tensor():
    a, b = torch.tensor([3.0, 4.0]), torch.ones(2, 2)
    got = [float(x) for x in _compat.foreach_norm([a, b])]
    assert got == [5.0, 2.0]


def test_module_slots_list_every_parameter_and_buffer_and_can_be_replaced():
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    params = [(type(m).__name__, k) for m, k, _ in _compat.module_parameter_slots(model)]
    assert params == [
        ("Linear", "weight"),
        ("Linear", "bias"),
        ("BatchNorm1d", "weight"),
        ("BatchNorm1d", "bias"),
    ]
    buffers = {k for _, k, _ in _compat.module_buffer_slots(model)}
    assert buffers == {"running_mean", "running_var", "num_batches_tracked"}
    bn = model[1]
    new = torch.full((3,), 7.0)
    _compat.set_module_buffer(bn, "running_mean", new)
    assert bn.running_mean is new and dict(bn.named_buffers())["running_mean"] is new


def test_optimizer_unscales_itself_is_what_grad_scaler_reads():
    import inspect

    from torch.amp import grad_scaler

    # GradScaler.step reads the same attribute to let a fused optimizer unscale itself.
    assert "_step_supports_amp_scaling" in inspect.getsource(grad_scaler.GradScaler.step), (
        "GradScaler no longer reads _step_supports_amp_scaling: update torch/_compat.py"
    )
    p = [nn.Parameter(torch.zeros(2))]
    assert _compat.optimizer_unscales_itself(torch.optim.SGD(p, lr=0.1)) is False
    fused = torch.optim.SGD(p, lr=0.1)
    fused._step_supports_amp_scaling = True  # what fused=True sets (fused needs a GPU here)
    assert _compat.optimizer_unscales_itself(fused) is True


def test_running_stat_buffers_are_what_a_train_forward_pass_updates():
    model = nn.Sequential(
        nn.Linear(2, 3),
        nn.BatchNorm1d(3),
        nn.InstanceNorm1d(3, track_running_stats=False),
        nn.BatchNorm1d(3, track_running_stats=False),
    )
    stats = _compat.running_stat_buffers(model)
    bn = model[1]
    assert [id(b) for b in stats] == [
        id(bn.running_mean),
        id(bn.running_var),
        id(bn.num_batches_tracked),
    ]
    saved = [b.clone() for b in stats]
    model.train()(torch.randn(4, 2))
    assert int(bn.num_batches_tracked) == 1 and not torch.equal(bn.running_mean, saved[0])
    _compat.copy_tensors(stats, saved)
    assert int(bn.num_batches_tracked) == 0 and torch.equal(bn.running_mean, saved[0])


def test_uncompiled_children_puts_the_eager_submodules_back_in_order():
    inner = nn.Linear(2, 2)
    model = nn.Sequential(torch.compile(inner, backend="eager"), nn.Tanh(), nn.Linear(2, 1))
    before = list(model.parameters())
    assert _compat.uncompiled_children(model) == 1
    assert model[0] is inner and list(model.parameters()) == before
    assert _compat.uncompiled_children(model) == 0


def test_compiled_code_run_eagerly_compiles_nothing():
    calls = []

    def backend(gm, example_inputs):
        calls.append(1)
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(lambda x: x * 2 + 1, backend=backend)
    with _compat.compiled_code_run_eagerly():
        assert torch.equal(fn(torch.ones(2)), torch.full((2,), 3.0))
    assert calls == []
    fn(torch.ones(2))
    assert calls == [1]


def test_module_attribute_slots_are_where_a_module_keeps_its_tensors_and_children():
    m = torch.nn.Sequential(torch.nn.BatchNorm1d(2))
    slots = _compat.module_attribute_slots()
    assert slots <= set(vars(m)) and slots <= set(vars(m[0]))
    held = [t for key in slots for t in vars(m[0])[key].values()]
    assert any(t is m[0].weight for t in held) and any(t is m[0].running_mean for t in held)
    assert any(c is m[0] for c in vars(m)["_modules"].values())


def test_unshadow_submodules_gives_a_transformer_layer_its_module_activation_back():
    import copy

    class Twice(nn.Module):
        def forward(self, x):
            return 2 * x

    layer = nn.TransformerDecoderLayer(8, 2, 16, batch_first=True)
    layer.activation = Twice()
    twin = copy.deepcopy(layer)
    # Still what torch does: __setstate__ hides the module activation behind F.relu.
    assert not isinstance(twin.activation, nn.Module), "torch fixed __setstate__: drop the helper"
    assert _compat.unshadow_submodules(layer, twin) == 1
    assert isinstance(twin.activation, Twice)
    assert _compat.unshadow_submodules(layer, copy.deepcopy(nn.Linear(2, 2))) == 0
