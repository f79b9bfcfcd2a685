"""Tests for helpers.rl: REINFORCE pieces and policies (the rule language: tests/test_nas.py)."""


import numpy as np
import pytest
import torch

from helpers.rl import (
    MASK_VALUE,
    BernoulliPolicy,
    BetaPolicy,
    CategoricalPolicy,
    LogitBernoulli,
    MovingAverageBaseline,
    advantages,
    discounted_returns,
    masked_logits,
    reinforce_loss,
    rl_metrics,
    sample,
    update_baseline,
)


# --------------------------------------------------------------------------- #
# reinforce.py
# --------------------------------------------------------------------------- #
def test_discounted_returns_known():
    r = torch.tensor([1.0, 0.0, 2.0])
    torch.testing.assert_close(discounted_returns(r, 0.5), torch.tensor([1.5, 1.0, 2.0]))
    torch.testing.assert_close(discounted_returns(r, 1.0), torch.tensor([3.0, 2.0, 2.0]))
    torch.testing.assert_close(discounted_returns(r, 0.0), r)
    # time on dim 0, batch on dim 1
    rb = torch.stack([r, 2 * r], dim=1)
    torch.testing.assert_close(
        discounted_returns(rb, 0.9),
        torch.tensor([[1 + 0.81 * 2, 2 * (1 + 0.81 * 2)], [1.8, 3.6], [2.0, 4.0]]),
    )


def test_update_baseline_and_convergence():
    b = update_baseline(None, torch.tensor([1.0, 3.0]), decay=0.9)
    assert float(b) == pytest.approx(2.0)
    b = update_baseline(b, torch.tensor([4.0]), decay=0.9)
    assert float(b) == pytest.approx(0.9 * 2.0 + 0.1 * 4.0)
    assert update_baseline(1.0, torch.tensor([0.0]), 0.5).item() == pytest.approx(0.5)

    gen = np.random.default_rng(0)
    mab = MovingAverageBaseline(decay=0.95)
    assert mab.value is None
    for _ in range(2000):
        mab.update(torch.as_tensor(gen.binomial(1, 0.3, size=8), dtype=torch.float32))
    assert float(mab.value) == pytest.approx(0.3, abs=0.05)
    assert not mab.value.requires_grad


def test_advantages():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0])
    torch.testing.assert_close(advantages(r, 2.0), torch.tensor([-1.0, 0.0, 1.0, 4.0]))
    torch.testing.assert_close(advantages(r, None), r)
    a = advantages(r, torch.tensor(2.0), normalize=True)
    assert float(a.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(a.std()) == pytest.approx(1.0, abs=1e-5)


def test_reinforce_loss_value_and_entropy_term():
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    adv = torch.tensor([1.0, -0.5], requires_grad=True)
    ent = torch.tensor([0.5, 0.7])
    loss = reinforce_loss(lp, adv)
    assert loss.item() == pytest.approx(-((-1.0 * 1.0) + (-2.0 * -0.5)) / 2)
    loss.backward()
    assert adv.grad is None  # advantage is detached
    torch.testing.assert_close(lp.grad, torch.tensor([-0.5, 0.25]))
    l2 = reinforce_loss(lp.detach(), adv.detach(), ent, entropy_coef=0.1)
    assert l2.item() == pytest.approx(loss.item() - 0.1 * 0.6)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_gradient_sign(sign):
    torch.manual_seed(0)
    policy = CategoricalPolicy(4)
    with torch.no_grad():
        policy.logits.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    opt = torch.optim.SGD(policy.parameters(), lr=0.1)
    action, log_prob, _ = sample(policy())
    before = log_prob.item()
    loss = reinforce_loss(log_prob, torch.tensor(sign))
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = policy().log_prob(action).item()
    if sign > 0:
        assert after > before
    else:
        assert after < before


def test_rl_metrics_keys():
    m = rl_metrics(torch.tensor([1.0, 0.0]), torch.tensor(0.25), torch.tensor([0.75, -0.25]), torch.tensor([0.6, 0.6]))
    assert set(m) == {"rl/reward", "rl/baseline", "rl/advantage", "rl/entropy"}
    assert all(type(v) is float for v in m.values())
    assert m["rl/reward"] == pytest.approx(0.5)
    assert m["rl/baseline"] == pytest.approx(0.25)
    assert m["rl/advantage"] == pytest.approx(0.25)
    assert m["rl/entropy"] == pytest.approx(0.6)
    assert rl_metrics(1.0, None, 0.0)["rl/baseline"] != rl_metrics(1.0, None, 0.0)["rl/baseline"]  # nan


# --------------------------------------------------------------------------- #
# bandits: REINFORCE + moving-average baseline
# --------------------------------------------------------------------------- #
def _train_bandit(p_arms, mask=None, steps=300, batch=8, seed=0):
    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    p_arms = np.asarray(p_arms)
    policy = CategoricalPolicy(len(p_arms))
    opt = torch.optim.Adam(policy.parameters(), lr=0.05)
    baseline = MovingAverageBaseline(decay=0.9)
    for _ in range(steps):
        action, log_prob, entropy = sample(policy(mask), n=batch)
        reward = torch.as_tensor(gen.binomial(1, p_arms[action.numpy()]), dtype=torch.float32)
        adv = advantages(reward, baseline.value)
        baseline.update(reward)
        loss = reinforce_loss(log_prob, adv, entropy, entropy_coef=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return policy


def test_two_armed_bandit_converges():
    policy = _train_bandit([0.2, 0.8])
    assert float(policy.probs()[1]) > 0.9


def test_three_armed_bandit_with_mask():
    mask = torch.tensor([True, True, False])  # the best arm (p=0.9) is forbidden
    policy = _train_bandit([0.2, 0.6, 0.9], mask=mask)
    torch.manual_seed(1)
    draws = policy(mask).sample((10_000,))
    assert int((draws == 2).sum()) == 0
    probs = policy.probs(mask)
    assert float(probs[2]) == 0.0
    assert float(probs[1]) > 0.9
    # without the mask the (never trained) third arm keeps probability > 0
    assert float(policy.probs()[2]) > 0.0


# --------------------------------------------------------------------------- #
# policies.py
# --------------------------------------------------------------------------- #
def test_masked_logits():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, False, True], [False, False, True]])
    out = masked_logits(logits, mask)
    torch.testing.assert_close(out, torch.tensor([[1.0, MASK_VALUE, 3.0], [MASK_VALUE, MASK_VALUE, 0.0]]))
    assert masked_logits(logits, None) is logits
    with pytest.raises(ValueError):
        masked_logits(logits, torch.tensor([[True, True, True], [False, False, False]]))
    # masked action: zero probability, finite entropy
    d = CategoricalPolicy(3)(torch.tensor([True, False, True]))
    assert d.probs[1].item() == 0.0
    assert torch.isfinite(d.entropy())
    assert d.entropy().item() == pytest.approx(np.log(2), abs=1e-6)


def test_sample_shapes():
    _, lp, ent = sample(CategoricalPolicy(5)(), n=8)
    assert lp.shape == (8,) and ent.shape == (8,)
    a, lp, ent = sample(CategoricalPolicy(5)())
    assert a.shape == () and lp.shape == ()
    bern = BernoulliPolicy((4, 4))
    a, lp, ent = sample(bern(), n=8)
    assert a.shape == (8, 4, 4) and lp.shape == (8,) and ent.shape == (8,)
    # joint log-prob of 16 fair coins
    torch.testing.assert_close(lp, torch.full((8,), 16 * np.log(0.5), dtype=torch.float32))
    torch.testing.assert_close(ent, torch.full((8,), 16 * np.log(2), dtype=torch.float32))
    # batched mask, keep the batch dim
    mask = torch.tensor([[True, False, True, True, True]] * 3)
    a, lp, _ = sample(CategoricalPolicy(5)(mask), n=8, batch_dims=1)
    assert a.shape == (8, 3) and lp.shape == (8, 3)
    assert not bool((a == 1).any())


def test_logit_bernoulli_matches_torch():
    torch.manual_seed(0)
    logits = torch.randn(5, 3) * 4
    value = torch.bernoulli(torch.full((7, 5, 3), 0.5))
    ours, ref = LogitBernoulli(logits=logits), torch.distributions.Bernoulli(logits=logits)
    torch.testing.assert_close(ours.log_prob(value), ref.log_prob(value))
    torch.testing.assert_close(ours.entropy(), ref.entropy())
    assert isinstance(BernoulliPolicy(3)(), torch.distributions.Bernoulli)


def test_bernoulli_policy_learns():
    torch.manual_seed(0)
    target = torch.tensor([1.0, 0.0, 1.0, 0.0])
    policy = BernoulliPolicy(4)
    opt = torch.optim.Adam(policy.parameters(), lr=0.1)
    baseline = MovingAverageBaseline(0.9)
    for _ in range(150):
        a, lp, _ = sample(policy(), n=16)
        reward = (a == target).float().sum(-1)
        adv = advantages(reward, baseline.update(reward))
        loss = reinforce_loss(lp, adv)
        opt.zero_grad()
        loss.backward()
        opt.step()
    p = torch.sigmoid(policy.logits.detach())
    assert bool(((p > 0.8) == target.bool()).all())


def test_beta_policy_moves_toward_target():
    torch.manual_seed(0)
    policy = BetaPolicy((4,))
    assert policy.mean.shape == (4,)
    torch.testing.assert_close(policy.mean, torch.full((4,), 0.5))
    opt = torch.optim.Adam(policy.parameters(), lr=0.05)
    baseline = MovingAverageBaseline(0.9)
    for _ in range(300):
        a, lp, ent = sample(policy(), n=32)
        assert lp.shape == (32,) and a.shape == (32, 4)
        reward = -(a - 0.8).abs().sum(-1)  # per-cell reward, summed: one per joint sample
        adv = advantages(reward, baseline.update(reward))
        loss = reinforce_loss(lp, adv)
        opt.zero_grad()
        loss.backward()
        opt.step()
    mean = policy.mean
    assert bool((mean > 0.7).all()), mean
    assert bool(((mean - 0.8).abs() < 0.1).all()), mean
