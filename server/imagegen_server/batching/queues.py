"""The scheduler's state, without its policy: who waits, in rank order, and who runs in which
batch. Pure Python; the scheduler decides what moves between them and when.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator

from ..base.request import Request, RequestStatus


class WaitingQueue:
    """Waiting requests, best-ranked first (priority, then arrival)."""

    def __init__(self) -> None:
        self._requests: list[Request] = []

    def __len__(self) -> int:
        return len(self._requests)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._requests)

    @property
    def worst(self) -> Request:
        return self._requests[-1]

    def insert(self, request: Request) -> None:
        index = len(self._requests)
        while index > 0 and self._requests[index - 1].rank > request.rank:
            index -= 1
        self._requests.insert(index, request)

    def remove(self, request: Request) -> None:
        self._requests.remove(request)

    def take(self, ticket: str) -> Request | None:
        """Removes and returns the request with `ticket`, if it waits."""
        for index, request in enumerate(self._requests):
            if request.ticket == ticket:
                del self._requests[index]
                return request
        return None

    def idle_at(self, priority: int) -> bool:
        """Whether no request of `priority` waits."""
        return all(request.priority != priority for request in self._requests)

    def pop_worst(self) -> Request:
        return self._requests.pop()

    def expire(self, now: float) -> list[Request]:
        """Removes and returns the requests whose queue deadline has passed."""
        expired = [
            r for r in self._requests if r.queue_deadline is not None and r.queue_deadline <= now
        ]
        if expired:
            gone = {id(request) for request in expired}
            self._requests = [request for request in self._requests if id(request) not in gone]
        return expired

    def next_deadline(self) -> float | None:
        """The earliest queue deadline."""
        return min(
            (r.queue_deadline for r in self._requests if r.queue_deadline is not None),
            default=None,
        )

    def by_group(self, group_of: Callable[[Request], Hashable]) -> dict[Hashable, list[Request]]:
        """Waiting requests by the batch they would form, each list in rank order."""
        groups: dict[Hashable, list[Request]] = {}
        for request in self._requests:
            groups.setdefault(group_of(request), []).append(request)
        return groups


class RunningBatches:
    """Running requests by ticket, each in one batch (its group), in the order they started."""

    def __init__(self) -> None:
        self._requests: dict[str, Request] = {}
        self._group: dict[str, Hashable] = {}  # ticket -> the batch it runs in

    def __len__(self) -> int:
        return len(self._requests)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._requests.values())

    @property
    def rows(self) -> int:
        return sum(request.rows for request in self._requests.values())

    def get(self, ticket: str) -> Request | None:
        return self._requests.get(ticket)

    def of(self, tickets: list[str]) -> list[Request]:
        """The running requests among `tickets`, in their order."""
        return [self._requests[ticket] for ticket in tickets if ticket in self._requests]

    def start(self, request: Request, group: Hashable) -> None:
        request.status = RequestStatus.RUNNING
        self._requests[request.ticket] = request
        self._group[request.ticket] = group

    def leave(self, ticket: str) -> None:
        self._requests.pop(ticket, None)
        self._group.pop(ticket, None)

    def in_group(self, group: Hashable) -> list[Request]:
        return [r for ticket, r in self._requests.items() if self._group[ticket] == group]

    def by_group(self) -> dict[Hashable, list[Request]]:
        groups: dict[Hashable, list[Request]] = {}
        for ticket, request in self._requests.items():
            groups.setdefault(self._group[ticket], []).append(request)
        return groups

    def past_deadline(self, now: float) -> list[Request]:
        return [r for r in self._requests.values() if r.deadline is not None and r.deadline <= now]
