"""Runs every system under every load, one run at a time, each with every server idle, with
the CPU meter and the measured server's metrics around it.

On a CPU the servers are up together and the systems take turns at each load point; on a GPU
they run one after another (see `Runner.run_all`). Runs are sized from the measured limit
(plan.py) and shortened, within floors, to fit the time budget; a run that other processes
disturbed is repeated while the budget allows. On a CPU, next to the two runs the targets read
(step-level, single workload, 1 client and the most clients), the engine alone is timed again in
this process: the machine's speed drifts by tens of percent over minutes, so the targets compare
figures taken a few seconds apart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import statistics
import time
import zlib
from collections.abc import Callable, Iterable
from typing import Any

from . import plan as plans
from .launch import Metrics, ServerProcess
from .limit import EngineBench, LimitResult, adjacent_latency, adjacent_throughput
from .loads import LoadGenerator
from .machine import BUSY_CORES, wait_for_quiet
from .output import fmt
from .servers import (
    Drive,
    Measured,
    ServerOptions,
    measure,
    rotated,
    server_command,
    start_server,
    wait_idle,
)
from .stats import RequestRecord, closed_loop_stats, open_loop_stats, records_table
from .targets import MIX_TARGET_FRACTION
from .workloads import Workload

# `make bench` must finish within 15 minutes; runs disturbed by other processes are repeated only
# while the estimate of what is left still fits these budgets.
FULL_BUDGET_S = 13.5 * 60
QUICK_BUDGET_S = 4 * 60
FULL_RETRIES = 8
QUICK_RETRIES = 2
QUIET_WAIT_S = 30.0  # longest wait for other processes to calm down before a repeat
RETRY_RESERVE_S = 45.0  # of the budget, kept for repeating disturbed runs
MIN_SCALE = 0.5  # runs are never shortened below this factor of the planned sizes
SERVER_START_S = 8.0  # estimates of the time around the runs
WARM_UP_S = 2.0
RUN_OVERHEAD_S = 0.6
ADJACENT_BATCHES = 1  # engine batches at the best size before and after the most-clients run


class Runner:
    """Runs every (system, workload, load) combination (see `run_all` for the order)."""

    def __init__(
        self,
        args: argparse.Namespace,
        sizing: plans.Sizing,
        limit: LimitResult,
        options: ServerOptions,
        workloads: list[Workload],
        engine: EngineBench,
        started: float,
    ) -> None:
        self._args = args
        self._sizing = sizing
        self._limit = limit
        self._options = options
        self._workloads = workloads
        self._engine = engine
        self._started = started
        self.light_load: dict[str, Any] | None = None  # see paired_light_load
        # Saturated rates measured so far, by (system, workload): they size the later runs.
        self._measured_ips: dict[tuple[str, str], float] = {}
        self._workload_names = [workload.name for workload in workloads]
        self._total = sum(
            len(workloads) * (len(self.clients_of(system)) + len(args.loads))
            for system in args.systems
        )
        self._done = 0
        self._remaining_s = self.estimate_s()
        self._budget_s = QUICK_BUDGET_S if args.quick else FULL_BUDGET_S
        self._retries_left = QUICK_RETRIES if args.quick else FULL_RETRIES

    @property
    def sizing(self) -> plans.Sizing:
        return self._sizing

    def limit_of(self, workload: Workload) -> float:
        if workload.name == "mix" and self._limit.mix_limit_ips:
            return self._limit.mix_limit_ips
        return self._limit.limit_ips

    def expected_ips(self, system: str, workload: Workload) -> float:
        """What `system` should deliver when saturated: only sizes the runs. The naive server
        serves one request at a time, so its 1-client run measures its capacity; until then
        the engine's batch-1 rate stands in."""
        if system != "naive":
            return self.limit_of(workload)
        measured = self._measured_ips.get((system, workload.name))
        if measured is not None:
            return measured
        batch_one = next((p for p in self._limit.sweep if p.batch_size == 1), None)
        scale = batch_one.images_per_s / self._limit.limit_ips if batch_one else 1.0
        return scale * self.limit_of(workload)

    def _open_plan(
        self, system: str, workload: Workload, fraction: float, sizing: plans.Sizing
    ) -> plans.OpenPlan:
        """The mix target's run gets more arrivals on the two servers it compares."""
        headline = (
            system != "naive"
            and workload.name == "mix"
            and abs(fraction - MIX_TARGET_FRACTION) < 1e-9
        )
        return plans.open_plan(fraction, self.limit_of(workload), sizing, headline=headline)

    def clients_of(self, system: str) -> list[int]:
        """Closed-loop levels for `system` (see --naive-max-clients)."""
        limit = self._args.naive_max_clients
        if system != "naive" or limit <= 0:
            return list(self._args.clients)
        return [clients for clients in self._args.clients if clients <= limit]

    def max_batch_of(self, system: str) -> int:
        return 1 if system == "naive" else int(self._args.max_batch_size)

    def estimate_s(self, sizing: plans.Sizing | None = None) -> float:
        """Seconds the runs should take (their overhead not included)."""
        sizing = sizing or self._sizing
        total = 0.0
        for system in self._args.systems:
            for workload in self._workloads:
                rate = self.expected_ips(system, workload)
                for clients in self.clients_of(system):
                    total += plans.estimate_closed_s(
                        plans.closed_plan(clients, rate, self.max_batch_of(system), sizing)
                    )
                for fraction in self._args.loads:
                    run_plan = self._open_plan(system, workload, fraction, sizing)
                    total += plans.estimate_open_s(run_plan, rate)
        return total

    def overhead_s(self) -> float:
        """Server starts and warm-ups, idle waits, metric scrapes and engine checks."""
        systems, workloads = len(self._args.systems), len(self._workloads)
        engine_checks = 0.0
        checks_engine = not self.one_server_at_a_time  # on a GPU the engine is freed first
        if checks_engine and "step" in self._args.systems and "single" in self._workload_names:
            best = self._limit.best_batch_size
            engine_checks = (
                2 * self._args.light_load_pairs * self._limit.latency_s
                + 2 * ADJACENT_BATCHES * best / self._limit.limit_ips
            )
        return (
            systems * (SERVER_START_S + workloads * WARM_UP_S)
            + self._total * RUN_OVERHEAD_S
            + engine_checks
        )

    def fit_to_budget(self) -> float:
        """Shortens the runs (see Sizing.scaled) until the estimate fits the time budget, keeping
        RETRY_RESERVE_S for repeats; returns the factor used (1 = as planned)."""
        available = (
            self._budget_s
            - (time.monotonic() - self._started)
            - self.overhead_s()
            - RETRY_RESERVE_S
        )
        factor = 1.0
        while factor > MIN_SCALE and self.estimate_s(self._sizing.scaled(factor)) > available:
            factor = round(factor - 0.05, 2)
        self._sizing = self._sizing.scaled(factor)
        self._remaining_s = self.estimate_s()
        return factor

    async def run_all(self) -> list[dict[str, Any]]:
        """Every run, ordered by system, workload, closed before open, then level.

        On a CPU every server is up at once and each load point runs on every system back to
        back, a different system first at each point: the machine's speed drifts by tens of
        percent over minutes, and this puts the runs that are compared a minute apart rather
        than ten. On a GPU each server holds a whole copy of the model, so the engine in this
        process lets go of the device first, and the servers run one at a time.
        """
        if not self.one_server_at_a_time:
            runs = await self._run_servers(list(self._args.systems))
        else:
            self._engine.release()
            runs = []
            for system in self._args.systems:
                runs += await self._run_servers([system])
        return sorted(runs, key=self._run_order)

    @property
    def one_server_at_a_time(self) -> bool:
        return self._engine.device.startswith("cuda")

    def _run_order(self, run: dict[str, Any]) -> tuple[int, int, int, float]:
        level = run["clients"] if run["kind"] == "closed" else run["fraction"]
        return (
            list(self._args.systems).index(run["system"]),
            self._workload_names.index(run["workload"]),
            0 if run["kind"] == "closed" else 1,
            level,
        )

    async def _run_servers(self, systems: list[str]) -> list[dict[str, Any]]:
        """Starts the servers of `systems` (one after another; all stay up), then runs every
        load point on each, the systems taking turns to go first."""
        runs = []
        with contextlib.ExitStack() as stack:
            servers: dict[str, ServerProcess] = {}
            for system in systems:  # one at a time: each loads the model on every core
                print(f"{system}: starting the server", flush=True)
                command = server_command(self._options, system)
                servers[system] = stack.enter_context(await start_server(system, command))
            generators = {
                system: LoadGenerator(server.target, run_name=system)
                for system, server in servers.items()
            }
            try:
                for workload in self._workloads:
                    for generator in generators.values():
                        await generator.warm_up(list(workload.classes))
                    for turn, (kind, level) in enumerate(self._points()):
                        for system in rotated(systems, turn):
                            if kind == "open" or level in self.clients_of(system):
                                await _wait_idle(servers.values())
                                runs.append(
                                    await self._run_point(
                                        servers[system], generators[system], workload, kind, level
                                    )
                                )
            finally:
                for generator in generators.values():
                    await generator.close()
        return runs

    async def _run_point(
        self,
        server: ServerProcess,
        generator: LoadGenerator,
        workload: Workload,
        kind: str,
        level: float,
    ) -> dict[str, Any]:
        """One run: `level` clients (closed loop) or `level` x the limit (open loop)."""
        system = server.name
        if kind == "open":
            run = await self._open(server, generator, system, workload, level)
        else:
            run = await self._closed(server, generator, system, workload, int(level))
            pairs_due = (system, workload.name, level) == ("step", "single", 1)
            if pairs_due and not self.one_server_at_a_time:
                self.light_load = await self.paired_light_load(server, generator, workload)
        run["sequence"] = self._done  # the order it ran in (the list is sorted afterwards)
        return run

    def _points(self) -> list[tuple[str, float]]:
        """The load points of a workload, in the order they run: clients up, then loads up."""
        return [("closed", clients) for clients in self._args.clients] + [
            ("open", fraction) for fraction in self._args.loads
        ]

    async def _closed(
        self,
        server: ServerProcess,
        generator: LoadGenerator,
        system: str,
        workload: Workload,
        clients: int,
    ) -> dict[str, Any]:
        run_plan = plans.closed_plan(
            clients, self.expected_ips(system, workload), self.max_batch_of(system), self._sizing
        )
        pick = self._picker(workload, f"closed-{clients}")

        async def drive(_before: Metrics) -> tuple[list[RequestRecord], float]:
            return await generator.closed_loop(run_plan.load, pick)

        # The saturation target compares this run with the engine alone timed around it.
        check = (
            system == "step"
            and workload.name == "single"
            and clients == max(self._args.clients)
            and not self.one_server_at_a_time
        )
        before = self._engine_batches(workload) if check else []
        estimate = plans.estimate_closed_s(run_plan)
        measured, attempts = await self._measure_quietly(server, drive, estimate)
        after = self._engine_batches(workload) if check else []
        stats = closed_loop_stats(measured.records, clients, run_plan.warm_s, measured.end_s)
        run = self._run_dict(system, workload, "closed", stats, measured, attempts)
        run.update(
            clients=clients,
            warm_s=run_plan.warm_s,
            planned_s=round(run_plan.load.duration_s, 2),
            duration_s=round(measured.end_s, 3),
        )
        if check:
            best = self._limit.best_batch_size
            run["engine_adjacent"] = {
                "images_per_s": best * len(before + after) / sum(before + after),
                "batch_size": best,
                "seconds": before + after,
            }
        if system == "naive" and clients == 1 and stats.throughput_ips > 0:
            self._measured_ips[(system, workload.name)] = stats.throughput_ips
        self._report(run, f"{clients} clients")
        return run

    def _engine_batches(self, workload: Workload) -> list[float]:
        best = self._limit.best_batch_size
        return adjacent_throughput(self._engine, workload.classes[0], best, ADJACENT_BATCHES)

    async def paired_light_load(
        self, server: ServerProcess, generator: LoadGenerator, workload: Workload
    ) -> dict[str, Any]:
        """Alternates one engine-alone request (in this process) and one request to the idle
        server, `--light-load-pairs` times: the light-load target's comparison, immune to the
        machine's drift (each pair is taken within two seconds, in alternating order)."""
        await wait_idle(server)
        cls = workload.classes[0]
        engine_s: list[float] = []
        server_s: list[float] = []
        for pair in range(self._args.light_load_pairs):
            for side in ("engine", "server") if pair % 2 == 0 else ("server", "engine"):
                if side == "engine":
                    engine_s += adjacent_latency(self._engine, cls, 1)
                else:
                    record = await generator.send_one(cls, index=100_000 + pair)
                    if record.latency_s is None or not record.ok:
                        raise RuntimeError(f"light-load request failed: {record.code}")
                    server_s.append(record.latency_s)
        engine_p50, server_p50 = statistics.median(engine_s), statistics.median(server_s)
        print(
            f"  light load, paired: server p50 {server_p50 * 1000:.0f} ms, engine alone "
            f"{engine_p50 * 1000:.0f} ms ({server_p50 / engine_p50 - 1:+.1%}, "
            f"{len(server_s)} pairs)",
            flush=True,
        )
        return {
            "system": server.name,
            "label": cls.label,
            "engine_p50_s": engine_p50,
            "server_p50_s": server_p50,
            "engine_s": [round(value, 4) for value in engine_s],
            "server_s": [round(value, 4) for value in server_s],
        }

    async def _open(
        self,
        server: ServerProcess,
        generator: LoadGenerator,
        system: str,
        workload: Workload,
        fraction: float,
    ) -> dict[str, Any]:
        run_plan = self._open_plan(system, workload, fraction, self._sizing)
        pick = self._picker(workload, f"open-{fraction}")
        seed = self._seed(workload, f"arrivals-{fraction}")

        async def drive(_before: Metrics) -> tuple[list[RequestRecord], float]:
            return await generator.open_loop(run_plan.load, pick, seed)

        estimate = plans.estimate_open_s(run_plan, self.expected_ips(system, workload))
        measured, attempts = await self._measure_quietly(server, drive, estimate)
        stats = open_loop_stats(measured.records, run_plan.warm_s, measured.end_s)
        run = self._run_dict(system, workload, "open", stats, measured, attempts)
        run.update(
            fraction=fraction,
            offered_ips=run_plan.load.rate_ips,
            arrivals=run_plan.load.arrivals,
            warm_s=run_plan.warm_s,
            arrivals_end_s=round(measured.end_s, 3),
            drain_cap_s=run_plan.load.drain_cap_s,
        )
        self._report(run, f"{fraction:.0%} load")
        return run

    async def _measure_quietly(
        self, server: ServerProcess, drive: Drive, estimate_s: float
    ) -> tuple[Measured, int]:
        """`measure`, repeated while other processes disturb it and the time budget allows;
        returns the last measurement and the attempts it took."""
        attempts = 0
        while True:
            attempts += 1
            measured = await measure(server, drive)
            self._remaining_s -= estimate_s if attempts == 1 else 0.0
            elapsed = time.monotonic() - self._started
            fits = elapsed + self._remaining_s + estimate_s + QUIET_WAIT_S < self._budget_s
            background = measured.cpu.background
            if background <= BUSY_CORES or self._retries_left == 0 or not fits:
                return measured, attempts
            self._retries_left -= 1
            print(
                f"    other processes used {background:.2f} cores meanwhile: running it again",
                flush=True,
            )
            # Until other processes leave the CPU alone for a window.
            pids = [os.getpid(), server.process.pid]
            await asyncio.to_thread(wait_for_quiet, pids, BUSY_CORES / 2, QUIET_WAIT_S)

    def _run_dict(
        self,
        system: str,
        workload: Workload,
        kind: str,
        stats: Any,
        measured: Measured,
        attempts: int,
    ) -> dict[str, Any]:
        return {
            "system": system,
            "workload": workload.name,
            "kind": kind,
            "clients": None,
            "fraction": None,
            "limit_ips": self.limit_of(workload),
            "stats": stats.to_dict(),
            "rows_per_step": measured.rows_per_step,
            "cpu": dataclasses.asdict(measured.cpu),
            "wall_s": round(measured.wall_s, 2),
            "attempts": attempts,
            "records": records_table(measured.records),
        }

    def _report(self, run: dict[str, Any], level: str) -> None:
        self._done += 1
        stats = run["stats"]
        latency = stats["latency"]
        failed = sum(stats["failed"].values())
        unfinished = latency["unfinished"]
        elapsed = time.monotonic() - self._started
        print(
            f"  [{self._done:2}/{self._total}] {elapsed / 60:4.1f} min  {run['system']:7} "
            f"{run['workload']:6} {level:11}: {stats['throughput_ips']:.3f} img/s "
            f"({stats['throughput_ips'] / run['limit_ips']:.2f} x limit), "
            f"p50 {fmt(latency['p50'])} p95 {fmt(latency['p95'])} p99 {fmt(latency['p99'])} s, "
            f"n={latency['count']}"
            + (f", {unfinished} unfinished" if unfinished else "")
            + (f", {failed} failed" if failed else "")
            + f", other CPU {run['cpu']['background']:.2f}",
            flush=True,
        )

    def _picker(self, workload: Workload, run_key: str) -> Callable[[int], Any]:
        seed = self._seed(workload, run_key)
        return lambda index: workload.class_of(index, seed)

    def _seed(self, workload: Workload, run_key: str) -> int:
        """The same for every system, so each sees the same classes and arrival times."""
        return zlib.crc32(f"{self._args.seed}:{workload.name}:{run_key}".encode())


async def _wait_idle(servers: Iterable[ServerProcess]) -> None:
    """Waits for every server to finish what the last run left (a run measures one server;
    the others must not be working meanwhile)."""
    for server in servers:
        if not await wait_idle(server):
            print(f"  warning: {server.name} server still busy before the run", flush=True)
