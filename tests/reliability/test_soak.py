"""`bench soak`'s growth estimate: the least-squares slope after the first quarter."""

from __future__ import annotations

import pytest

from medvlp_jax.bench import soak


def test_growth_skips_the_warm_up_quarter_and_fits_the_slope():
    hours = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    mib = [100.0, 900.0, 1000.0, 1005.0, 1010.0, 1015.0, 1020.0, 1025.0]  # warm-up, then 50/h
    assert soak.growth_per_hour(hours, mib) == pytest.approx(50.0)
    assert soak.growth_per_hour(hours[:4], mib[:4]) is None


def test_rss_is_read_from_proc():
    assert 1 < soak.rss_mib() < 1e6
