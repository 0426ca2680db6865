"""bnlib.diagnose: each finding code on a model with exactly that bug (found, on the
right module) and on a clean one (nothing found), statically and through a traced
forward (custom forwards included); the model left untouched, also when the forward
raises; every BN class recognised; printing and the notebook table."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlib
from bnlib import nn as bnn
from bnlib.diagnose import CODES, Finding, Findings, diagnose


def _codes(findings) -> list[tuple[str, str]]:
    return [(f.module, f.code) for f in findings]


def _trained(model: nn.Module, x: torch.Tensor, steps: int = 20) -> nn.Module:
    """model with running statistics of x's distribution, returned in eval mode."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(x)
    return model.eval()


class Custom(nn.Module):
    """A non-Sequential model whose wiring only a traced forward can see."""

    def __init__(self, bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(4, 6, bias=bias)
        self.norm = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = self.norm(self.fc(self.drop(x)))
        return self.head(torch.relu(h))


# ---------------------------------------------------------------- bias-before-bn


def test_bias_before_bn_found_statically_on_the_bn():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU())
    assert _codes(diagnose(model)) == [("1", "bias-before-bn")]
    assert "bias=False" in diagnose(model)[0].message
    assert "'0'" in diagnose(model)[0].message  # names the layer with the bias


def test_bias_before_bn_clean_models():
    assert diagnose(nn.Sequential(nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6))) == []
    # an activation in between: the bias is not cancelled by the BN
    assert diagnose(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.BatchNorm1d(6))) == []


def test_bias_before_bn_sees_through_flatten_and_nested_sequentials():
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 2, 3)), nn.Flatten(), nn.Identity(),
        nn.BatchNorm1d(2 * 3 * 3),
    )
    x = torch.randn(8, 1, 5, 5)
    assert _codes(diagnose(model)) == [("3", "bias-before-bn")]
    assert _codes(diagnose(model, x)) == [("3", "bias-before-bn")]


def test_bias_before_bn_traced_in_a_custom_forward():
    x = torch.randn(16, 4)
    # without x, FX traces the custom forward (no Sequential to read)
    assert _codes(diagnose(Custom(bias=True))) == [("norm", "bias-before-bn")]
    assert _codes(diagnose(Custom(bias=True), x)) == [("norm", "bias-before-bn")]
    assert diagnose(Custom(bias=False), x) == []


def test_an_inplace_activation_hides_the_bias():
    """Linear -> ReLU(inplace) -> BN: the ReLU returns the Linear's own tensor, changed;
    the traced wiring must see the ReLU, not the Linear."""

    class InplaceCustom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(4, 6), nn.ReLU(inplace=True)
            self.norm = nn.BatchNorm1d(6)

        def forward(self, x):
            return self.norm(self.act(self.fc(x)))

    class FunctionalInplace(InplaceCustom):  # changed in place where no hook sees
        def forward(self, x):
            h = self.fc(x)
            return self.norm(h.relu_())

    class Block(nn.Module):  # a container whose output is its child's, changed
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)

        def forward(self, x):
            return self.fc(x).relu_()

    x = torch.randn(16, 4)
    assert diagnose(InplaceCustom(), x) == []
    assert diagnose(FunctionalInplace(), x) == []
    assert diagnose(nn.Sequential(Block(), nn.BatchNorm1d(6)), x) == []
    # without the in-place change, the Linear is seen through its container
    class PlainBlock(Block):
        def forward(self, x):
            return self.fc(x)

    assert _codes(diagnose(nn.Sequential(PlainBlock(), nn.BatchNorm1d(6)), x)) == [
        ("1", "bias-before-bn")]


def test_traced_wiring_overrides_a_sequential_used_as_a_list():
    """A Sequential iterated by a custom forward with a functional op in between: its
    order says Linear -> BN, the tensors say otherwise."""

    class Looped(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))

        def forward(self, x):
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return x

    assert diagnose(Looped()) == []  # FX sees the tanh, Sequential order did not
    assert diagnose(Looped(), torch.randn(16, 4)) == []


# ---------------------------------------------------------------- keras-momentum


def test_keras_momentum():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False),
                          nn.BatchNorm2d(2, momentum=0.99))
    found = diagnose(model)
    assert _codes(found) == [("1", "keras-momentum")]
    assert "0.01" in found[0].message
    for momentum in (0.1, 0.5, None):
        clean = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False),
                              nn.BatchNorm2d(2, momentum=momentum))
        assert diagnose(clean) == []


# ----------------------------------------------------------- frozen-but-updating


def _frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_frozen_but_updating():
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6))
    model = _frozen(_trained(model, torch.randn(64, 4))).train()  # fine-tuning
    assert _codes(diagnose(model)) == [("1", "frozen-but-updating")]
    assert _codes(diagnose(model, torch.randn(16, 4))) == [("1", "frozen-but-updating")]
    model[1].eval()  # the fix
    assert diagnose(model) == []
    # trainable, or not tracking running statistics: nothing to report
    assert diagnose(nn.Sequential(nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6))) == []
    assert diagnose(_frozen(nn.BatchNorm1d(6, track_running_stats=False))) == []


# ------------------------------------------------------------- dropout-before-bn


def test_dropout_before_bn_through_a_linear_layer():
    model = nn.Sequential(
        nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(6, 6, bias=False), nn.BatchNorm1d(6),
    )
    found = diagnose(model)
    assert _codes(found) == [("5", "dropout-before-bn")]
    assert "'3'" in found[0].message
    x = torch.randn(16, 4)
    assert _codes(diagnose(model, x)) == [("5", "dropout-before-bn")]
    assert _codes(diagnose(model.eval(), x)) == [  # dropout in eval mode too
        ("1", "untrained-running-stats"), ("5", "dropout-before-bn"),
        ("5", "untrained-running-stats")]


def test_dropout_before_bn_directly_and_through_activations():
    direct = nn.Sequential(nn.Dropout(0.2), nn.BatchNorm1d(4))
    assert _codes(diagnose(direct)) == [("1", "dropout-before-bn")]
    # an activation between dropout and the linear layer: still a variance shift
    act = nn.Sequential(nn.Dropout(0.2), nn.ReLU(), nn.Linear(4, 4, bias=False),
                        nn.BatchNorm1d(4))
    assert _codes(diagnose(act)) == [("3", "dropout-before-bn")]


def test_dropout_before_bn_clean_models():
    # the fix: dropout after the last BN
    assert diagnose(nn.Sequential(
        nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(6, 2))) == []
    # p = 0 is no dropout; two weighted layers in between are out of reach
    assert diagnose(nn.Sequential(nn.Dropout(0.0), nn.BatchNorm1d(4))) == []
    assert diagnose(nn.Sequential(
        nn.Dropout(0.5), nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False),
        nn.BatchNorm1d(4))) == []


def test_dropout_before_bn_traced_in_a_custom_forward():
    x = torch.randn(16, 4)
    # without x, FX traces the custom forward (no Sequential to read)
    assert _codes(diagnose(Custom(dropout=0.3))) == [("norm", "dropout-before-bn")]
    assert _codes(diagnose(Custom(dropout=0.3), x)) == [("norm", "dropout-before-bn")]
    assert diagnose(Custom(dropout=0.0), x) == []


# ------------------------------------------------------- untrained-running-stats


def test_untrained_running_stats():
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6)).eval()
    found = diagnose(model)
    assert _codes(found) == [("1", "untrained-running-stats")]
    assert "recompute_bn_statistics" in found[0].message
    assert diagnose(model.train()) == []  # training mode uses batch statistics
    assert diagnose(_trained(model, torch.randn(32, 4))) == []


def test_loaded_statistics_without_a_batch_count_are_not_untrained():
    """A checkpoint from elsewhere may carry statistics but num_batches_tracked = 0."""
    bn = nn.BatchNorm1d(3).eval()
    state = bn.state_dict()
    state["running_mean"] = torch.tensor([0.5, -1.0, 2.0])
    bn.load_state_dict(state)
    assert int(bn.num_batches_tracked) == 0
    assert diagnose(bn) == []
    fresh = nn.BatchNorm1d(3).eval()
    assert _codes(diagnose(fresh)) == [("", "untrained-running-stats")]


def test_a_lazy_bn_that_never_ran_is_untrained_and_x_is_refused():
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.LazyBatchNorm1d()).eval()
    assert _codes(diagnose(model)) == [("1", "untrained-running-stats")]
    with pytest.raises(ValueError, match="lazy"):
        diagnose(model, torch.randn(8, 4))
    assert isinstance(model[1], nn.LazyBatchNorm1d)  # still uninitialized


# ----------------------------------------------------------- stale-running-stats


def _stale_pair():
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6))
    return _trained(model, torch.randn(256, 4)), torch.randn(64, 4)


def test_stale_running_stats_shifted_and_scaled():
    model, x = _stale_pair()
    assert diagnose(model, x) == []  # the same distribution
    assert diagnose(model) == []  # needs x
    assert _codes(diagnose(model, x + 5)) == [("1", "stale-running-stats")]
    assert _codes(diagnose(model, 5 * x)) == [("1", "stale-running-stats")]  # var x 25
    assert _codes(diagnose(model, x / 5)) == [("1", "stale-running-stats")]  # var / 25
    assert "AdaBN" in diagnose(model, x + 5)[0].message


def test_stale_running_stats_over_all_dims_but_channels():
    model = _trained(nn.Sequential(nn.BatchNorm2d(3)), torch.randn(16, 3, 5, 5))
    x = torch.randn(4, 3, 5, 5)
    assert diagnose(model, x) == []
    assert _codes(diagnose(model, x - 3)) == [("0", "stale-running-stats")]


def test_stale_is_not_repeated_for_untrained_statistics():
    model = nn.Sequential(nn.BatchNorm1d(6)).eval()
    assert _codes(diagnose(model, torch.randn(16, 6) + 10)) == [
        ("0", "untrained-running-stats")]


# ------------------------------------------------------------------- small-batch


def test_small_batch():
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6))
    found = diagnose(model, torch.randn(4, 4))
    assert _codes(found) == [("1", "small-batch")]
    assert "GroupNorm" in found[0].message
    assert diagnose(model, torch.randn(8, 4)) == []
    assert diagnose(model) == []  # needs x
    assert _codes(diagnose(Custom(), torch.randn(4, 4))) == [("norm", "small-batch")]
    model = _trained(model, torch.randn(64, 4))
    assert diagnose(model, torch.randn(4, 4)) == []  # eval mode: running statistics


def test_small_batch_without_running_statistics_even_in_eval_mode():
    bn = nn.BatchNorm2d(3, track_running_stats=False).eval()
    assert _codes(diagnose(bn, torch.randn(2, 3, 4, 4))) == [("", "small-batch")]


# ------------------------------------------------------------- the model untouched


def _state(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
            [m.training for m in model.modules()],
            [id(t) for t in model.state_dict(keep_vars=True).values()],
            [p.requires_grad for p in model.parameters()])


def _assert_same_state(model: nn.Module, before) -> None:
    after = _state(model)
    assert list(after[0]) == list(before[0])
    for key in before[0]:
        assert torch.equal(after[0][key], before[0][key]), key
    assert after[1:] == before[1:]
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


@pytest.mark.parametrize("training", [True, False])
def test_the_model_is_untouched(device, training):
    model = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6, momentum=0.99), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(6, 6), bnn.BatchNorm1d(6), bnn.BatchRenorm1d(6),
    ).to(device)
    _trained(model, torch.randn(64, 4, device=device), steps=3)
    model.train(training)
    model[1].eval()  # a mix of modes
    x = torch.randn(4, 4, device=device)
    loss = model(x).sum()  # a pending backward must survive the call
    before, rng = _state(model), torch.get_rng_state()
    found = diagnose(model, x)
    assert found  # it did look
    _assert_same_state(model, before)
    assert torch.equal(torch.get_rng_state(), rng)
    loss.backward()


def test_the_model_is_untouched_when_the_forward_raises():
    class Raises(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.norm = nn.Linear(4, 6), nn.BatchNorm1d(6)

        def forward(self, x):
            self.norm(self.fc(x))  # updates the running statistics, then fails
            self.norm.running_var = torch.full((6,), 7.0)  # rebinds a buffer
            self.eval()
            raise RuntimeError("boom")

    model = Raises()
    before = _state(model)
    with pytest.raises(RuntimeError, match="boom"):
        diagnose(model, torch.randn(16, 4))
    _assert_same_state(model, before)
    assert model.training and model.norm.training


def test_a_wrong_input_raises_and_changes_nothing():
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6))
    before = _state(model)
    with pytest.raises(RuntimeError):
        diagnose(model, torch.randn(16, 5))
    _assert_same_state(model, before)


# ------------------------------------------------------------ every BN class counts


@pytest.mark.parametrize("make", [
    lambda: nn.BatchNorm1d(6, momentum=0.9),
    lambda: nn.SyncBatchNorm(6, momentum=0.9),
    lambda: bnn.BatchNorm1d(6, momentum=0.9),
    lambda: bnn.BatchRenorm1d(6, momentum=0.9),
    lambda: bnn.GhostBatchNorm1d(6, virtual_batch_size=4, momentum=0.9),
    lambda: bnn.SyncBatchNorm(6, momentum=0.9),
], ids=["torch", "sync", "bnlib", "renorm", "ghost", "bnlib-sync"])
def test_every_bn_class_is_recognised(make):
    model = nn.Sequential(nn.Linear(4, 6), make())
    assert _codes(diagnose(model)) == [("1", "bias-before-bn"), ("1", "keras-momentum")]
    model.eval()
    traced = _codes(diagnose(model, torch.randn(16, 4)))
    assert traced[:2] == [("1", "bias-before-bn"), ("1", "keras-momentum")]


def test_ghost_bn_small_virtual_batches():
    model = nn.Sequential(bnn.GhostBatchNorm1d(6, virtual_batch_size=4))
    assert _codes(diagnose(model, torch.randn(32, 6))) == [("0", "small-batch")]
    model = nn.Sequential(bnn.GhostBatchNorm1d(6, virtual_batch_size=16))
    assert diagnose(model, torch.randn(32, 6)) == []


def test_no_batch_norm_no_findings():
    assert diagnose(nn.Sequential()) == []
    assert diagnose(nn.Sequential(), torch.randn(3, 4)) == []
    assert diagnose(nn.Linear(4, 2), torch.randn(3, 4)) == []
    assert diagnose(nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5),
                                  nn.LayerNorm(6))) == []


# -------------------------------------------------------------- order and printing


def test_findings_in_module_order_then_code_order():
    model = nn.Sequential(
        nn.Dropout(0.5), nn.Linear(4, 6), nn.BatchNorm1d(6, momentum=0.99),
        nn.Linear(6, 6), _frozen(nn.BatchNorm1d(6, momentum=0.9)),
    )
    assert _codes(diagnose(model, torch.randn(4, 4))) == [
        ("2", "bias-before-bn"), ("2", "keras-momentum"), ("2", "dropout-before-bn"),
        ("2", "small-batch"),
        ("4", "bias-before-bn"), ("4", "keras-momentum"), ("4", "frozen-but-updating"),
        ("4", "small-batch"),
    ]
    assert list(CODES).index("bias-before-bn") == 0 and len(set(CODES)) == 7


def test_printing_and_the_notebook_table():
    found = diagnose(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, momentum=0.99)))
    assert isinstance(found, Findings) and isinstance(found, list)
    assert all(isinstance(f, Finding) for f in found)
    assert str(found[0]).startswith("1: [bias-before-bn] ")
    assert str(found).splitlines() == [str(f) for f in found]
    assert repr(found) == str(found)
    table = found._repr_html_()
    assert table.startswith("<table>") and table.count("<tr>") == 1 + len(found)
    assert "<code>keras-momentum</code>" in table
    assert found._repr_markdown_().count("\n| `1` |") == 2
    empty = diagnose(nn.Sequential())
    assert "No batch-norm problems" in str(empty)
    assert "<table>" not in empty._repr_html_()
    assert str(Finding("keras-momentum", "", "m")) == "(model): [keras-momentum] m"


def test_the_html_is_escaped():
    table = Findings([Finding("bias-before-bn", "a<b>", "x & y")])._repr_html_()
    assert "a&lt;b&gt;" in table and "x &amp; y" in table


def test_exported_from_bnlib():
    assert bnlib.diagnose is diagnose and bnlib.Finding is Finding
    assert {"diagnose", "Finding"} <= set(bnlib.__all__)


# ------------------------------------------------ issue 15: false alarms, blind spots


def _population(model: nn.Module, make_x, batches: int = 50) -> nn.Module:
    """model with the population statistics of make_x's distribution, in eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average: the population's statistics
    return _trained(model, torch.cat([make_x() for _ in range(batches)]), steps=1)


def test_stale_no_alarm_where_the_running_variance_is_far_below_eps():
    """MobileNet's layers: eps = 1e-3, running variances ~1.6e-4. Normalized with them
    a correct batch has variance ~0.14, which the old rule called stale (and
    recomputing the statistics could not clear). eps counts on both sides now."""
    model = nn.Sequential(nn.BatchNorm2d(16, eps=1e-3))
    model = _population(model, lambda: torch.randn(32, 16, 4, 4) * 0.0126)
    assert model[0].running_var.median() < 2e-4
    for seed in range(5):
        torch.manual_seed(seed)
        x = torch.randn(32, 16, 4, 4) * 0.0126
        assert diagnose(model, x) == [], seed
        assert _codes(diagnose(model, x + 0.05)) == [("0", "stale-running-stats")]
        assert _codes(diagnose(model, x * 5)) == [("0", "stale-running-stats")]


@pytest.mark.parametrize("shape", [(1, 32), (2, 32), (1, 16, 6, 6), (2, 16, 6, 6)])
def test_stale_no_alarm_on_eval_batches_of_one_or_two_examples(shape):
    """A clean model on a tiny batch from its training distribution gets no finding
    (the variance of two values is itself noise; a single image's spatial variance
    is not the population's); a real shift is still found."""
    c = shape[1]
    scale = torch.rand(c) + 0.5  # per channel, and per example below (images)

    def sample(n):
        x = torch.randn(n, *shape[1:]) * scale.view(-1, *[1] * (len(shape) - 2))
        if len(shape) == 4:  # example-level variation, as between real images
            x = x + torch.randn(n, c, 1, 1)
        return x

    model = _population(nn.Sequential(
        nn.BatchNorm1d(c) if len(shape) == 2 else nn.BatchNorm2d(c)),
        lambda: sample(64))
    for seed in range(20):
        torch.manual_seed(seed)
        assert diagnose(model, sample(shape[0])) == [], seed
    assert _codes(diagnose(model, sample(shape[0]) + 10)) == [
        ("0", "stale-running-stats")]


def _body_sync_diagnose(rank, world_size, n):
    """diagnose on rank 0 only, with a SyncBatchNorm in training: it must not wait
    for rank 1 (which never calls anything) and must count the global batch."""
    import time

    from bnlib.diagnose import diagnose as diag
    from bnlib.nn import SyncBatchNorm
    if rank != 0:
        return None
    model = nn.Sequential(nn.Linear(4, 6, bias=False), SyncBatchNorm(6)).train()
    start = time.monotonic()
    found = diag(model, torch.randn(n, 4))
    return dict(found=[(f.module, f.code, f.message) for f in found],
                seconds=time.monotonic() - start)


def test_sync_batchnorm_counts_the_global_batch_and_issues_no_collective():
    from bnlib.spawn import launch

    four, _ = launch(_body_sync_diagnose, 2, 4, timeout_s=90, collective_timeout_s=40)
    assert four["found"] == [], four  # 2 ranks x 4 = a global batch of 8
    assert four["seconds"] < 20  # no collective waited on rank 1
    two, _ = launch(_body_sync_diagnose, 2, 2, timeout_s=90, collective_timeout_s=40)
    [(module, code, message)] = two["found"]
    assert (module, code) == ("1", "small-batch")
    assert "4 example(s) over its 2 processes" in message
    assert "SyncBatchNorm" not in message  # it already is one


@pytest.mark.parametrize("dropout", [nn.AlphaDropout, nn.FeatureAlphaDropout])
def test_alpha_dropout_is_not_the_variance_shift_bug(dropout):
    """AlphaDropout keeps mean and variance by design (SELU networks)."""
    model = nn.Sequential(dropout(0.2), nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6))
    assert diagnose(model) == []
    assert diagnose(model, torch.randn(16, 4)) == []
    model[0] = nn.Dropout(0.2)
    assert _codes(diagnose(model)) == [("2", "dropout-before-bn")]


class DenseLike(nn.Module):
    """torchvision's densenet: F.dropout in forward, then torch.cat into the next BN."""

    def __init__(self, drop_rate: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(7)
        self.drop_rate = drop_rate

    def forward(self, x):
        h = nn.functional.dropout(self.conv(x), p=self.drop_rate,
                                  training=self.training)
        return self.norm(torch.cat([x, h], 1))


def test_functional_dropout_is_seen_with_and_without_x():
    x = torch.randn(8, 3, 5, 5)
    for found in (diagnose(DenseLike(0.2), x), diagnose(DenseLike(0.2))):
        assert _codes(found) == [("norm", "dropout-before-bn")]
        assert "functional dropout(p=0.2) in '(model)'" in found[0].message \
            or "functional dropout(p=0.2)" in found[0].message
    assert diagnose(DenseLike(0.0), x) == []
    assert diagnose(DenseLike(0.0)) == []


class Residual(nn.Module):
    """resnet-like wiring with no Sequential to read: conv (bias) -> bn, plus a skip."""

    def __init__(self, bias: bool, reuse: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.reuse = reuse

    def forward(self, x):
        h = self.conv(self.drop(x))
        out = self.bn(h)
        return out + h if self.reuse else out + x  # bn(h) + h: the bias is used


def test_wiring_without_x_is_traced_with_fx():
    """resnet18/densenet's conv bias before BN and a Dropout before a conv, in custom
    forwards: found without x too (FX), where Sequential order saw nothing."""
    assert _codes(diagnose(Residual(bias=True, reuse=False))) == [
        ("bn", "bias-before-bn"), ("bn", "dropout-before-bn")]
    assert _codes(diagnose(Residual(bias=False, reuse=False))) == [
        ("bn", "dropout-before-bn")]


def test_a_bias_also_used_on_another_path_is_not_reported():
    """bn(h) + h: h's bias does not cancel, its gradient is not zero."""
    x = torch.randn(8, 4, 5, 5)
    for found in (diagnose(Residual(bias=True, reuse=True)),
                  diagnose(Residual(bias=True, reuse=True), x)):
        assert _codes(found) == [("bn", "dropout-before-bn")]


def test_x_is_not_modified_by_an_inplace_first_layer():
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 6, bias=False),
                          nn.BatchNorm1d(6))
    x = torch.randn(16, 4)
    before = x.clone()
    diagnose(model, x)
    assert torch.equal(x, before), "diagnose changed the caller's x"


def test_parameters_are_not_copied():
    """Only buffers and modes can change in a forward without gradients: the probe
    copies those, not the parameters (memory on large models)."""
    from torch.overrides import TorchFunctionMode

    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6))
    params = {p.data_ptr() for p in model.parameters()}
    cloned = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") == "clone" and args:
                cloned.append(args[0].data_ptr())
            return func(*args, **(kwargs or {}))

    with Spy():
        diagnose(model, torch.randn(16, 4))
    assert cloned, "the spy saw no clone at all"
    assert not params & set(cloned), "a parameter was cloned"
