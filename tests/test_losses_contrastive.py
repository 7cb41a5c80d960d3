"""contrastive_loss and kto_pair_loss against values worked out by hand with python's math."""

import math

import pytest
import torch
import torch.nn.functional as F

from taxfree.errors import TaxfreeError
from taxfree.losses import EXO_PREF_EPS, contrastive_loss, dpo_sigmoid_loss, has_preference, kto_pair_loss


def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


# Two prompts, K = 3: (log-ratios, rewards).
Z3 = [[1.0, -1.0, 0.5], [0.2, 0.0, -0.4]]
R3 = [[1.0, 0.0, 2.0], [-1.0, 3.0, 0.5]]


def test_exo_rw_is_reverse_kl_to_reward_softmax():
    beta_pi, beta_r = 0.5, 2.0
    expected = []
    for z, r in zip(Z3, R3):
        p = softmax([beta_pi * x for x in z])
        q = softmax([x / beta_r for x in r])
        expected.append(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q)))
    got = contrastive_loss("exo-rw", t(Z3), t(R3), beta_pi=beta_pi, beta_r=beta_r)
    assert got.item() == pytest.approx(sum(expected) / 2, rel=1e-12)


def test_dpo_rw_is_cross_entropy_from_reward_softmax():
    beta_pi, beta_r = 0.5, 2.0
    expected = []
    for z, r in zip(Z3, R3):
        p = softmax([beta_pi * x for x in z])
        q = softmax([x / beta_r for x in r])
        expected.append(-sum(qi * math.log(pi) for pi, qi in zip(p, q)))
    got = contrastive_loss("dpo-rw", t(Z3), t(R3), beta_pi=beta_pi, beta_r=beta_r)
    assert got.item() == pytest.approx(sum(expected) / 2, rel=1e-12)


def test_closed_forms_at_zero_logratios():
    # p is uniform when z = 0: dpo-rw = log K whatever the rewards; exo-rw = 0 when q is uniform too.
    z = torch.zeros(1, 3, dtype=torch.float64)
    assert contrastive_loss("dpo-rw", z, t([[5.0, -1.0, 0.0]])).item() == pytest.approx(math.log(3))
    assert contrastive_loss("exo-rw", z, t([[2.0, 2.0, 2.0]])).item() == pytest.approx(0.0, abs=1e-15)
    # exo-pref at p = (1/2, 1/2): -log 2 - (log(1 - eps) + log eps) / 2.
    z2 = torch.zeros(1, 2, dtype=torch.float64)
    eps = 0.01
    expected = -math.log(2) - 0.5 * (math.log(1 - eps) + math.log(eps))
    assert contrastive_loss("exo-pref", z2, t([[1.0, 0.0]]), pref_eps=eps).item() == pytest.approx(expected)
    assert contrastive_loss("dpo-pref", z2, t([[1.0, 0.0]])).item() == pytest.approx(math.log(2))


def test_exo_pref_by_hand_and_winner_follows_reward():
    beta, eps = 0.3, 0.05
    # prompt 0: completion 0 wins; prompt 1: completion 1 wins.
    z = [[2.0, -1.0], [0.5, 1.5]]
    r = [[1.0, 0.0], [0.0, 1.0]]
    expected = []
    for (zw, zl) in [(2.0, -1.0), (1.5, 0.5)]:
        pw, pl = softmax([beta * zw, beta * zl])
        expected.append(pw * (math.log(pw) - math.log(1 - eps)) + pl * (math.log(pl) - math.log(eps)))
    got = contrastive_loss("exo-pref", t(z), t(r), beta_pi=beta, pref_eps=eps)
    assert got.item() == pytest.approx(sum(expected) / 2, rel=1e-12)


def test_tied_pairs_carry_no_preference():
    """A pair with equal rewards counts 0 in the -pref kinds: no loss, no gradient, whichever
    completion comes first; the mean stays over all B prompts."""
    beta, eps = 0.3, 0.05
    z = t([[2.0, -1.0], [0.5, 1.5]]).requires_grad_(True)
    r = t([[1.0, 0.0], [0.7, 0.7]])  # prompt 1 ties
    pw, pl = softmax([beta * 2.0, beta * -1.0])
    exo_pair0 = pw * (math.log(pw) - math.log(1 - eps)) + pl * (math.log(pl) - math.log(eps))
    loss = contrastive_loss("exo-pref", z, r, beta_pi=beta, pref_eps=eps)
    assert loss.item() == pytest.approx(exo_pair0 / 2, rel=1e-12)
    loss.backward()
    assert z.grad[1].tolist() == [0.0, 0.0]
    # d/dz_w of p_w (log p_w - log q_w) + p_l (log p_l - log q_l), halved by the mean over 2 prompts
    expected_grad = beta * pw * pl * ((math.log(pw) - math.log(1 - eps)) - (math.log(pl) - math.log(eps))) / 2
    assert z.grad[0, 0].item() == pytest.approx(expected_grad, rel=1e-10)
    assert z.grad[0, 1].item() == pytest.approx(-expected_grad, rel=1e-10)
    dpo = contrastive_loss("dpo-pref", z, r, beta_pi=beta)
    assert dpo.item() == pytest.approx(-math.log(sigmoid(beta * 3.0)) / 2, rel=1e-12)
    # The EXO authors' code makes the second completion win a tie: the tied prompt would add
    # KL(p || (eps, 1 - eps)) with p = softmax(beta * (0.5, 1.5)) = (0.4256, 0.5744) instead of
    # nothing: 0.5744 (ln 0.5744 - ln 0.95) + 0.4256 (ln 0.4256 - ln 0.05) = 0.622.
    p1 = softmax([beta * 0.5, beta * 1.5])
    authors_extra = p1[1] * (math.log(p1[1]) - math.log(1 - eps)) + p1[0] * (math.log(p1[0]) - math.log(eps))
    assert authors_extra == pytest.approx(0.6223, abs=1e-4)
    for kind in ("exo-pref", "dpo-pref"):
        # the order of a tied pair does not matter, and a batch of ties is a zero loss that
        # still backpropagates (zero gradients)
        swapped = contrastive_loss(kind, t([[2.0, -1.0], [1.5, 0.5]]), r, beta_pi=beta, pref_eps=eps)
        assert swapped.item() == pytest.approx(contrastive_loss(kind, z.detach(), r, beta_pi=beta, pref_eps=eps).item())
        zt = t([[0.3, -2.0]]).requires_grad_(True)
        tied = contrastive_loss(kind, zt, t([[1.0, 1.0]]), beta_pi=beta, pref_eps=eps)
        tied.backward()
        assert tied.item() == 0.0 and zt.grad.tolist() == [[0.0, 0.0]]
        # a batch's loss is the mean of its micro-batches' losses, ties or not
        halves = [contrastive_loss(kind, z.detach()[i : i + 1], r[i : i + 1], beta_pi=beta, pref_eps=eps).item()
                  for i in range(2)]
        whole = contrastive_loss(kind, z.detach(), r, beta_pi=beta, pref_eps=eps).item()
        assert whole == pytest.approx(sum(halves) / 2, rel=1e-12)
    # The rw kinds keep their softmax target: equal rewards are a uniform target, not a skip.
    assert contrastive_loss("exo-rw", t([[0.0, 1.0]]), t([[0.7, 0.7]]), beta_pi=1.0).item() > 0.0
    assert has_preference(r).tolist() == [True, False]


def trl_exo_pair(delta, beta, label_smoothing):
    """TRL 1.16 DPOTrainer's exo_pair per-sequence loss, transcribed from trl/trainer/dpo_trainer.py."""
    eps = torch.tensor(label_smoothing, dtype=delta.dtype)
    qw, log_qw = torch.sigmoid(beta * delta), F.logsigmoid(beta * delta)
    ql, log_ql = torch.sigmoid(-beta * delta), F.logsigmoid(-beta * delta)
    return qw * (log_qw - torch.log1p(-eps)) + ql * (log_ql - torch.log(eps))


def test_exo_pref_matches_trl_exo_pair_at_same_eps():
    beta, eps = 0.1, 1e-3  # TRL's recommended label_smoothing for exo_pair
    z_w = t([3.0, -2.0, 0.0, 10.0, 0.7])
    z_l = t([1.0, 4.0, 0.0, -10.0, 0.2])
    ours = torch.stack(
        [
            contrastive_loss("exo-pref", t([[w, l]]), t([[1.0, 0.0]]), beta_pi=beta, pref_eps=eps)
            for w, l in zip(z_w, z_l)
        ]
    )
    theirs = trl_exo_pair(z_w - z_l, beta, eps)
    # "Same loss up to a constant" (docs/algorithms.md 2): the constant is the same for every pair
    # and is in fact zero, as both are KL(p || (1 - eps, eps)).
    diff = ours - theirs
    assert torch.allclose(diff, diff[0].expand_as(diff), atol=1e-12)
    assert diff[0].abs().item() < 1e-12


def test_dpo_pref_equals_dpo_sigmoid():
    beta = 0.2
    z_w, z_l = [1.0, -0.5, 3.0], [0.0, 0.5, -2.0]
    expected = sum(-math.log(sigmoid(beta * (w - l))) for w, l in zip(z_w, z_l)) / 3
    z = t([[w, l] for w, l in zip(z_w, z_l)])
    got = contrastive_loss("dpo-pref", z, t([[1.0, 0.0]] * 3), beta_pi=beta)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    assert got.item() == pytest.approx(dpo_sigmoid_loss(t(z_w), t(z_l), beta=beta).item(), rel=1e-12)
    # Swapping the columns together with the rewards changes nothing: the winner follows the reward.
    swapped = contrastive_loss("dpo-pref", z.flip(1), t([[0.0, 1.0]] * 3), beta_pi=beta)
    assert swapped.item() == pytest.approx(expected, rel=1e-12)


def test_rw_kinds_reduce_to_pref_kinds_for_pref_rewards():
    z = t([[0.4, -1.3], [2.0, 2.5]])
    r = t([[1.0, 0.0], [1.0, 0.0]])
    # q = softmax((1, 0) / 0.1) = (1 - eps, eps) with eps = 1 / (1 + e^10): the EXO code's default.
    assert contrastive_loss("exo-rw", z, r, beta_pi=0.5, beta_r=0.1).item() == pytest.approx(
        contrastive_loss("exo-pref", z, r, beta_pi=0.5).item(), rel=1e-12
    )
    assert EXO_PREF_EPS == pytest.approx(4.54e-5, rel=1e-3)
    # A near-zero beta_r makes q one-hot: dpo-rw becomes DPO.
    assert contrastive_loss("dpo-rw", z, r, beta_pi=0.5, beta_r=1e-3).item() == pytest.approx(
        contrastive_loss("dpo-pref", z, r, beta_pi=0.5).item(), rel=1e-12
    )


def test_gradient_pushes_best_completion_up_and_ignores_rewards():
    z = t([[0.0, 0.0, 0.0]]).requires_grad_(True)
    r = t([[0.0, 1.0, -1.0]]).requires_grad_(True)
    for kind in ("exo-rw", "dpo-rw"):
        z.grad = None
        contrastive_loss(kind, z, r, beta_pi=1.0, beta_r=1.0).backward()
        grad = z.grad[0]
        assert grad[1] < 0 < grad[2]  # descent raises the best and lowers the worst
        assert r.grad is None


def test_kto_pair_by_hand():
    beta = 0.5
    z_w = t([1.0, 3.0]).requires_grad_(True)
    z_l = t([-2.0, 0.5]).requires_grad_(True)
    kl_w = max((1.0 + 3.0) / 2, 0.0)  # 2.0
    kl_l = max((-2.0 + 0.5) / 2, 0.0)  # -0.75 clamped to 0
    terms = [1 - sigmoid(beta * (1.0 - kl_l)), 1 - sigmoid(beta * (3.0 - kl_l))]
    terms += [1 - sigmoid(beta * (kl_w - (-2.0))), 1 - sigmoid(beta * (kl_w - 0.5))]
    loss = kto_pair_loss(z_w, z_l, beta)
    assert loss.item() == pytest.approx(sum(terms) / 4, rel=1e-12)
    # KL estimates are detached: z_w[0] reaches the loss through its own term only.
    loss.backward()
    s = sigmoid(beta * 1.0)
    assert z_w.grad[0].item() == pytest.approx(-beta * s * (1 - s) / 4, rel=1e-12)
    s = sigmoid(beta * (kl_w + 2.0))
    assert z_l.grad[0].item() == pytest.approx(beta * s * (1 - s) / 4, rel=1e-12)


def test_kto_pair_uses_positive_kl_estimates():
    # All log-ratios negative: both KL estimates clamp to 0, so the loss is the mean of 1 - sigmoid(+-beta z).
    z_w, z_l = t([-1.0, -3.0]), t([-0.5, -2.0])
    expected = (sum(1 - sigmoid(0.2 * x) for x in (-1.0, -3.0)) + sum(1 - sigmoid(-0.2 * x) for x in (-0.5, -2.0))) / 4
    assert kto_pair_loss(z_w, z_l, 0.2).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: contrastive_loss("exo", t([[0.0, 1.0]]), t([[1.0, 0.0]])), "unknown kind 'exo'"),
        (lambda: contrastive_loss("exo-pref", t([[0.0, 1.0, 2.0]]), t([[1.0, 0.0, 2.0]])), "K must be 2"),
        (lambda: contrastive_loss("dpo-pref", t([[0.0, 1.0, 2.0]]), t([[1.0, 0.0, 2.0]])), "K must be 2"),
        (lambda: contrastive_loss("exo-rw", t([[0.0, 1.0]]), t([[1.0, 0.0]]), beta_pi=-0.1), "beta_pi must be > 0"),
        (lambda: contrastive_loss("exo-rw", t([[0.0, 1.0]]), t([[1.0, 0.0]]), beta_r=0.0), "beta_r must be > 0"),
        (lambda: contrastive_loss("exo-rw", t([[0.0, 1.0]]), t([[1.0, 0.0, 1.0]])), "both be [B, K]"),
        (lambda: contrastive_loss("exo-rw", t([0.0, 1.0]), t([1.0, 0.0])), "both be [B, K]"),
        (lambda: contrastive_loss("exo-rw", t([[0.0]]), t([[1.0]])), "K >= 2"),
        (lambda: contrastive_loss("exo-pref", t([[0.0, 1.0]]), t([[1.0, 0.0]]), pref_eps=0.7), "pref_eps"),
        (lambda: kto_pair_loss(t([0.0, 1.0]), t([1.0]), 0.1), "one length"),
        (lambda: kto_pair_loss(t([0.0]), t([1.0]), -1.0), "beta must be > 0"),
    ],
)
def test_bad_arguments_raise_taxfree_error(call, message):
    with pytest.raises(TaxfreeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call()
