"""Pre-training metrics (l2, CA, PAR) and teacher-forced predictions."""

from __future__ import annotations

import math

import torch

from lcm_fast.evaluation import contrastive_accuracy, l2_distance, paraphrasing, teacher_forced_predictions

from .conftest import random_model, tiny_config


def test_metrics_on_known_cases():
    target = torch.tensor([[[0.0, 1.0], [1.0, 0.5], [2.0, -1.0], [3.0, 0.2], [10.0, 3.0]]])
    mask = torch.tensor([[False, True, True, True, True]])
    assert l2_distance(target, target, mask) == 0.0
    # perfect predictions: every non-excluded candidate is farther than the (zero) own distance
    assert contrastive_accuracy(target, target, mask) == 1.0
    shifted = target + torch.tensor([0.0, 3.0])
    assert math.isclose(l2_distance(shifted, target, mask), 3.0, rel_tol=1e-6)
    # predicting the previous sentence copies the context: PAR > 1 is expected
    copy = torch.roll(target, 1, dims=1)
    assert paraphrasing(copy, target, mask) >= 1.0


def test_contrastive_accuracy_excludes_neighbours():
    target = torch.zeros(1, 4, 1)
    target[0, :, 0] = torch.tensor([0.0, 1.0, 2.0, 3.0])
    pred = target.clone()
    pred[0, 3, 0] = 2.1  # closer to x_2 (its excluded neighbour) than to x_3
    mask = torch.tensor([[False, False, False, True]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    # candidates for n = 3: x_0 and x_1 only (x_2, x_3 excluded), both farther than |2.1 - 3|
    assert contrastive_accuracy(pred, target, mask, valid) == 1.0
    pred[0, 3, 0] = 1.9  # now x_1 (0.9 away) is nearer than the ground truth (1.1), x_0 (1.9) farther
    assert contrastive_accuracy(pred, target, mask, valid) == 0.5


def test_teacher_forced_predictions_are_causal():
    for family in ("base_lcm", "two_tower_diffusion_lcm"):
        model = random_model(tiny_config(family))
        x = torch.randn(2, 5, 24)
        lens = torch.tensor([5, 4])
        a = teacher_forced_predictions(model, x, lens, steps=4)
        changed = x.clone()
        changed[:, 3:] += 1.0
        b = teacher_forced_predictions(model, changed, lens, steps=4)
        torch.testing.assert_close(a[:, :4], b[:, :4])  # position n sees only positions < n
        assert not torch.allclose(a[:, 4], b[:, 4])


def test_base_lcm_predictions_are_the_shifted_forward():
    model = random_model(tiny_config("base_lcm"))
    x, lens = torch.randn(2, 5, 24), torch.tensor([5, 5])
    pred = teacher_forced_predictions(model, x, lens)
    with torch.no_grad():
        ref = model.predict_next_sentence(x, lens)
    torch.testing.assert_close(pred[:, 1:], ref[:, :-1])
