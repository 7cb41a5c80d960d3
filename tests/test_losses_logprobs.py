"""sequence_logps: the one-token shift, -100 masking and temperature, by hand."""

import math

import pytest
import torch

from taxfree.errors import TaxfreeError
from taxfree.losses import sequence_logps

LN3, LN4 = math.log(3.0), math.log(4.0)


def hand_batch():
    # vocab 2; row 0 scores label 1 at t=1 (from logits[0]) and label 0 at t=2 (from logits[1]).
    logits = torch.tensor(
        [
            [[0.0, LN3], [LN4, 0.0], [1e4, -1e4]],  # the last position predicts nothing: must not count
            [[5.0, 1.0], [2.0, 2.0], [0.0, 0.0]],
        ]
    )
    labels = torch.tensor([[-100, 1, 0], [-100, -100, -100]])
    return logits, labels


def test_shift_and_mask_by_hand():
    logits, labels = hand_batch()
    logps, n = sequence_logps(logits, labels)
    # p(1 | [0, ln 3]) = 3/4 ; p(0 | [ln 4, 0]) = 4/5
    assert logps[0].item() == pytest.approx(math.log(3 / 4) + math.log(4 / 5), rel=1e-6)
    assert logps[1].item() == 0.0
    assert n.tolist() == [2, 0]


def test_temperature_divides_logits():
    logits, labels = hand_batch()
    logps, _ = sequence_logps(logits, labels, temperature=2.0)
    # logits / 2: p(1 | [0, ln 3 / 2]) = sqrt3 / (1 + sqrt3) ; p(0 | [ln 2, 0]) = 2/3
    expected = math.log(math.sqrt(3) / (1 + math.sqrt(3))) + math.log(2 / 3)
    assert logps[0].item() == pytest.approx(expected, rel=1e-6)


def test_low_precision_logits_are_scored_in_float32():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7)
    labels = torch.randint(0, 7, (3, 5))
    labels[:, :2] = -100
    ref, n_ref = sequence_logps(logits.to(torch.bfloat16).float(), labels)
    got, n = sequence_logps(logits.to(torch.bfloat16), labels)
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref, atol=1e-5) and torch.equal(n, n_ref)


def test_gradient_flows_to_scored_positions_only():
    logits, labels = hand_batch()
    logits.requires_grad_(True)
    sequence_logps(logits, labels)[0].sum().backward()
    assert logits.grad[0, 2].abs().sum() == 0  # last position
    assert logits.grad[1].abs().sum() == 0  # fully masked row
    assert logits.grad[0, 0].abs().sum() > 0


def test_bad_shapes_and_temperature():
    logits, labels = hand_batch()
    with pytest.raises(TaxfreeError, match="logits must be"):
        sequence_logps(logits, labels[:, :2])
    with pytest.raises(TaxfreeError, match="temperature must be > 0"):
        sequence_logps(logits, labels, temperature=0.0)
