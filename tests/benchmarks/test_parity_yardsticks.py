"""The yardsticks the architecture page judges agreement by (benchmarks/_parity.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _parity import NOISE, logit_deviation, with_noise


def test_logit_deviation_is_the_mean_absolute_difference_in_percent_of_the_spread():
    reference = np.array([[1.0, 3.0], [5.0, 7.0]])  # std 2.236...
    got = reference + np.array([[0.5, -0.5], [0.0, 1.0]])  # mean |difference| 0.5
    assert logit_deviation(got, reference) == pytest.approx(100 * 0.5 / np.sqrt(5))
    assert logit_deviation(reference, reference) == 0.0


def test_input_noise_is_a_quarter_grey_level_kept_inside_the_pixel_range():
    x = torch.full((4, 3, 64, 64), 0.5)
    noisy = with_noise(x, torch.Generator().manual_seed(0))
    assert float((noisy - x).std()) == pytest.approx(NOISE, rel=0.02)
    edges = with_noise(torch.tensor([0.0, 1.0]).repeat(1000), torch.Generator().manual_seed(1))
    assert float(edges.min()) == 0.0 and float(edges.max()) == 1.0
    again = with_noise(x, torch.Generator().manual_seed(0))
    assert torch.equal(noisy, again)  # the generator decides it
