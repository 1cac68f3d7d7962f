"""bench/tenants_live.py: its tokens files load as the server loads them, and its report's
arithmetic (shares per window, p95, C's first waits) on records made here."""

from __future__ import annotations

from pathlib import Path

import pytest
from imagegen_server.api.auth import TokenAuthenticator

from bench.stats import OK, RequestRecord, records_table
from bench.tenants_live import (
    TENANTS,
    TOKENS,
    WEIGHTS,
    first_waits_s,
    p95_s,
    summary_lines,
    tokens_file,
    window_shares,
)


@pytest.mark.parametrize("fair", [True, False])
def test_the_tokens_files_load_as_the_server_loads_them(tmp_path: Path, fair: bool) -> None:
    authenticator = TokenAuthenticator.from_file(tokens_file(tmp_path, fair))
    for tenant in TENANTS:
        policy = authenticator.policy_of(TOKENS[tenant])
        assert policy is not None and policy.role == "client"
        expected = (tenant, WEIGHTS[tenant]) if fair else ("shared", 1)
        assert (policy.tenant.name, policy.tenant.weight) == expected


def record(
    issued: float, finished: float | None, first: bool = False, code: str = OK
) -> RequestRecord:
    return RequestRecord(
        0, 8, "256x256/8", issued, client=0, first_of_client=first, finished_s=finished, code=code
    )


def test_shares_count_finished_images_by_window_and_tenant() -> None:
    records = {
        "A": [record(0, 5), record(5, 25)],
        "B": [record(0, 6), record(6, 12), record(12, 18), record(18, 30, code="CUT")],
        "C": [record(20, 35, first=True), record(35, 45)],  # 45: past the run
    }
    windows = window_shares(records, window_s=20, seconds=40)
    assert windows[0] == {"A": 1, "B": 3}
    assert windows[1] == {"A": 1, "C": 1}


def test_p95_leaves_each_clients_first_request_out_and_first_waits_keep_only_those() -> None:
    records = [record(0, 50, first=True), *(record(t, t + 2) for t in range(20))]
    assert p95_s(records) == pytest.approx(2.0)
    assert first_waits_s(records) == [50.0]


def test_the_summary_has_a_row_per_window_and_the_late_tenants_first_wait() -> None:
    runs = {
        scheduler: {tenant: records_table([record(0, 10), record(21, 31, first=True)])
                    for tenant in TENANTS}
        for scheduler in ("fcfs", "fair")
    }  # fmt: skip
    results = {
        "command": "python -m bench tenants-live",
        "quick": False,
        "wall_s": 300.0,
        "machine": {"date": "d", "cpu_model": "cpu", "logical_cores": 2, "torch": "2"},
        "settings": {"request": "256x256/8", "clients_per_tenant": 6, "seconds": 40,
                     "window_s": 20, "late_s": 20, "max_batch_size": 4},
        "runs": runs,
    }  # fmt: skip
    lines = summary_lines(results)
    rows = [line for line in lines if line.startswith("| fair share |")]
    assert len(rows) == 3  # two windows, then C's first requests
    assert rows[0].split(" | ")[2:6] == ["33%", "33%", "33%", "3"]
    assert "10.0 s (its clients' first: median 10.0 s)" in rows[-1]
