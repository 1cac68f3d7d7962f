"""Fair share between tenants within a priority level: start-time fair queuing by cost.

Every request gets a virtual start tag when it is queued (`Request.fair_tag`); the scheduler
orders waiting requests by (priority, tag, arrival). A tenant's next tag starts where its
previous request's virtual finish (tag + cost / weight) left off, or at the level's virtual time
(the tag of the last request admitted at that priority) if that is later. So:

- tenants flooding the same level are served in proportion to their weights, measured in cost
  (megapixel-steps, base/cost.py), not in requests: a tenant sending requests 4 times as
  large gets a quarter as many through;
- a lone tenant's tags follow its arrivals, so it is served first come first served and gets
  the whole machine;
- a tenant that was idle cannot bank credit: its tags restart at the virtual time, so the
  "recent window" over which shares are kept is the backlog now waiting; and a tenant arriving
  late waits for at most one request of each other tenant of its level before its first starts;
- priorities still come first (tags only order requests within a level), and no request starves:
  the virtual time rises with every admission, so every tag is eventually the smallest.

Pure Python; no clock at all (tags are in cost units, not seconds).
"""

from __future__ import annotations

from ..base.request import Request

MIN_WEIGHT = 1e-3  # a weight of zero would make a tenant's tags infinite


class FairShare:
    """Virtual times per priority level and each tenant's last virtual finish."""

    def __init__(self) -> None:
        self._virtual_time: dict[int, float] = {}  # priority -> tag of the last admitted
        self._finish: dict[tuple[int, str], float] = {}  # (priority, tenant) -> last finish

    def tag(self, request: Request, level_idle: bool) -> None:
        """Sets the tag of a request being queued; `level_idle` says nothing else waits at its
        priority, and then the level's virtual time catches up with every finish (the work
        done while nobody competed is nobody's debt)."""
        level = request.priority
        if level_idle:
            self._catch_up(level)
        now = self._virtual_time.get(level, 0.0)
        start = max(now, self._finish.get((level, request.tenant), now))
        request.fair_tag = start
        self._finish[(level, request.tenant)] = start + request.cost / max(
            request.weight, MIN_WEIGHT
        )

    def admitted(self, request: Request) -> None:
        """A request left the queue for a batch: its level's virtual time moves up to its tag,
        and tenants whose last finish it passed are forgotten (they start afresh)."""
        level = request.priority
        now = max(self._virtual_time.get(level, 0.0), request.fair_tag)
        self._virtual_time[level] = now
        stale = [key for key, finish in self._finish.items() if key[0] == level and finish <= now]
        for key in stale:
            del self._finish[key]

    def _catch_up(self, level: int) -> None:
        finishes = [finish for key, finish in self._finish.items() if key[0] == level]
        self._virtual_time[level] = max([self._virtual_time.get(level, 0.0), *finishes])
        for key in [key for key in self._finish if key[0] == level]:
            del self._finish[key]

    def tenants(self) -> int:
        """Tenants with a finish tag ahead of their level's virtual time (bounded state)."""
        return len(self._finish)
