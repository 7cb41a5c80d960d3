"""DPO (with label smoothing), IPO and hinge losses against hand-computed values; the method table."""

import inspect
import math

import pytest
import torch

from taxfree.errors import TaxfreeError
from taxfree.losses import (
    CONTRASTIVE_KINDS,
    TAXFREE_CONTRASTIVE,
    TRL_DPO,
    TRL_KTO,
    align_method,
    dpo_sigmoid_loss,
    hinge_loss,
    ipo_loss,
    methods,
)


def t(xs):
    return torch.tensor(xs, dtype=torch.float64)


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_dpo_sigmoid_with_label_smoothing_by_hand():
    beta, ls = 0.5, 0.1
    z_w, z_l = [2.0, -1.0], [0.0, 1.0]
    expected = 0.0
    for w, l in zip(z_w, z_l):
        d = beta * (w - l)
        expected += -(1 - ls) * log_sigmoid(d) - ls * log_sigmoid(-d)
    got = dpo_sigmoid_loss(t(z_w), t(z_l), beta=beta, label_smoothing=ls)
    assert got.item() == pytest.approx(expected / 2, rel=1e-12)
    # d = 1 and d = -1: -log sigmoid(1) and -log sigmoid(-1) without smoothing.
    plain = dpo_sigmoid_loss(t(z_w), t(z_l), beta=beta)
    assert plain.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2, rel=1e-12)


def test_ipo_is_length_normalised_by_hand():
    # pair 0: 2/4 - 1/2 = 0 -> (0 - 1/(2*0.25))^2 = 4 ; pair 1: 3/3 - (-1)/1 = 2 -> (2 - 2)^2 = 0
    got = ipo_loss(t([2.0, 3.0]), t([1.0, -1.0]), t([4.0, 3.0]), t([2.0, 1.0]), beta=0.25)
    assert got.item() == pytest.approx((4.0 + 0.0) / 2, rel=1e-12)
    # Lengths matter: the same log-ratios with unit lengths give (1 - 2)^2 and (4 - 2)^2.
    got = ipo_loss(t([2.0, 3.0]), t([1.0, -1.0]), t([1.0, 1.0]), t([1.0, 1.0]), beta=0.25)
    assert got.item() == pytest.approx((1.0 + 4.0) / 2, rel=1e-12)


def test_hinge_by_hand():
    # beta * margin = 0.5, 2, -0.1 -> relu(1 - .) = 0.5, 0, 1.1
    got = hinge_loss(t([5.0, 20.0, 0.0]), t([0.0, 0.0, 1.0]), beta=0.1)
    assert got.item() == pytest.approx((0.5 + 0.0 + 1.1) / 3, rel=1e-12)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: dpo_sigmoid_loss(t([1.0]), t([0.0]), beta=0.0), "beta must be > 0"),
        (lambda: dpo_sigmoid_loss(t([1.0]), t([0.0]), label_smoothing=0.5), "label_smoothing"),
        (lambda: dpo_sigmoid_loss(t([1.0, 2.0]), t([0.0]), beta=0.1), "one length"),
        (lambda: ipo_loss(t([1.0]), t([0.0]), t([0.0]), t([1.0])), "lengths must be >= 1"),
        (lambda: hinge_loss(t([[1.0]]), t([[0.0]])), "1-D tensors"),
    ],
)
def test_pairwise_bad_arguments(call, message):
    with pytest.raises(TaxfreeError, match=message):
        call()


def test_method_registry_covers_every_method_once():
    assert set(methods()) == {
        "dpo", "ipo", "hinge", "exo-pair", "kto", "kto-pair", "exo-pref", "exo-rw", "dpo-rw", "dpo-pref"
    }
    ours = {name for name, m in methods().items() if m.trainer == TAXFREE_CONTRASTIVE}
    assert ours == set(CONTRASTIVE_KINDS) | {"kto-pair"}
    assert align_method("kto").trainer == TRL_KTO
    assert {name for name, m in methods().items() if m.needs_samples} == {"exo-rw", "dpo-rw"}
    assert {name for name, m in methods().items() if not m.pairwise} == {"exo-rw", "dpo-rw"}


def test_trl_loss_names_and_arguments_exist_in_installed_trl():
    import dataclasses

    from trl import DPOConfig, KTOConfig
    from trl.trainer import dpo_trainer

    source = inspect.getsource(dpo_trainer.DPOTrainer)
    fields = {TRL_DPO: {f.name for f in dataclasses.fields(DPOConfig)}, TRL_KTO: {f.name for f in dataclasses.fields(KTOConfig)}}
    for name, m in methods().items():
        if m.trainer == TRL_DPO:
            assert f'loss_type == "{m.loss_type}"' in source, name
        if m.trainer in fields:
            assert set(m.trainer_args) <= fields[m.trainer], name  # every mapped setting is a real argument
    kto_choices = KTOConfig.__dataclass_fields__["loss_type"].metadata["choices"]
    assert all(m.loss_type in kto_choices for m in methods().values() if m.trainer == TRL_KTO)


def test_unknown_method_suggests_nearest():
    with pytest.raises(TaxfreeError, match=r"unknown alignment method 'exo_rw' \(did you mean exo-rw\?\)"):
        align_method("exo_rw")
