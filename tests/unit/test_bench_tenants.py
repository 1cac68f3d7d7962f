"""bench/tenants.py: fair share against first come first served on the real scheduler."""

from __future__ import annotations

from collections import Counter

from bench.simulate import CURVES
from bench.tenants import shares, simulate_tenants


def test_fair_share_gives_weights_1_3_1_where_fcfs_gives_clients_equal_turns() -> None:
    fair = simulate_tenants(True, CURVES["linear"], clients=8, duration_s=120)
    first_come = simulate_tenants(False, CURVES["linear"], clients=8, duration_s=120)
    windows = shares(fair, window_s=20, duration_s=120)
    contended = windows[1] + windows[2]  # 20-60 s: A and B flooding
    together = windows[3] + windows[4]  # 60-100 s: C has joined
    # Tolerance: +-20% of the 3:1 ratio (a window holds a few dozen images).
    assert 2.4 <= contended["B"] / contended["A"] <= 3.6, contended
    assert 2.4 <= together["B"] / together["C"] <= 3.6, together
    assert 0.6 <= together["A"] / together["C"] <= 1.6, together
    unfair = sum(shares(first_come, window_s=20, duration_s=120)[1:3], Counter())
    assert unfair["B"] / unfair["A"] < 1.5  # first come first served: by clients, not weight
    assert fair.first_wait_c < first_come.first_wait_c / 2
