"""The training objectives' paper options: CFG condition dropout (the paper's rate and the official fixed count) and
clamped-SNR weighting (eq. 17) with both of the paper's bounds."""

from __future__ import annotations

import pytest
import torch

from lcm_fast.training.data import Batch
from lcm_fast.training.losses import cfg_dropout_rows, default_cfg_dropout_rule, diffusion_loss

from ..conftest import random_model, tiny_config


@pytest.mark.parametrize("L", [5, 8, 20, 128])
def test_paper_rule_drops_at_the_rate_for_every_length(L):
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([cfg_dropout_rows(256, L, 0.15, "paper", g, torch.device("cpu")) for _ in range(20)])
    rate = draws[..., 1:].float().mean().item()  # position 0 has no context to drop
    assert abs(rate - 0.15) < 0.01 and not draws[..., 0].any()
    assert (draws[0] != draws[0, :1]).any()  # documents drop different positions


def test_official_rule_is_a_fixed_count_shared_by_every_document():
    g, cpu = torch.Generator().manual_seed(0), torch.device("cpu")
    assert cfg_dropout_rows(4, 7, 0.15, "official", g, cpu) is None  # floor(6 * 0.15) = 0: none at all
    rows = cfg_dropout_rows(4, 20, 0.15, "official", g, cpu)
    assert rows.shape == (20,) and int(rows.sum()) == 2 and not rows[0]  # 10 % at L = 20
    with pytest.raises(ValueError, match="unknown cfg_dropout_rule 'bernoulli'"):
        cfg_dropout_rows(4, 20, 0.15, "bernoulli", g, cpu)


@pytest.mark.parametrize("family", ["two_tower_diffusion_lcm", "one_tower_diffusion_lcm"])
def test_a_dropped_row_sees_no_context(family):
    """Per-document rows ([B, N]): a dropped row's prediction does not change with its document's context, a kept
    row's does."""
    model = random_model(tiny_config(family)).eval()
    torch.manual_seed(0)
    clean, noisy = torch.randn(2, 6, model.sonar_dim), torch.randn(2, 6, model.sonar_dim)
    t = torch.randint(0, 100, (2, 6))
    drop = torch.zeros(2, 6, dtype=torch.bool)
    drop[0, 4] = True  # document 0 drops position 4; document 1 keeps it
    other = clean.clone()
    other[:, :4] += 1.0  # another context before position 4
    with torch.no_grad():
        a, b = (model(x, noisy, t, cfg_dropout_rows=drop) for x in (clean, other))
    torch.testing.assert_close(a[0, 4], b[0, 4])
    assert not torch.allclose(a[1, 4], b[1, 4])
    assert default_cfg_dropout_rule(model) == ("official" if family.startswith("two") else "paper")


def test_clamped_snr_weights_within_the_bounds():
    """eq. 17: max(min(SNR(t), l_max), l_min) multiplies each target's error, no renormalisation: with l_min = l_max
    = c the loss is c times the unweighted one, and the paper's two settings weight differently."""
    model = random_model(tiny_config("two_tower_diffusion_lcm"))
    batch = Batch(torch.randn(3, 7, model.sonar_dim), torch.tensor([7, 5, 6]), torch.zeros(3, dtype=torch.long))

    def loss(**kw):
        return diffusion_loss(model, batch, torch.Generator().manual_seed(1), **kw)[0].item()

    plain = loss()
    assert loss(weighting="clamp_snr", snr_clamp=(2.0, 2.0)) == pytest.approx(2 * plain, rel=1e-5)
    low, high = loss(weighting="clamp_snr", snr_clamp=(0.001, 5.0)), loss(weighting="clamp_snr", snr_clamp=(0.0, 10.0))
    assert 0 < low < high < 10 * plain
