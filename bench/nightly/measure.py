"""Measuring the nightly benchmark: each variant timed on a fresh copy of its data set and checked against
the reference, interleaved repeat by repeat; the figures become the JSON object bench.subscriptions prints.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.nightly.dataset import Dataset, State, differences, restore, snapshot
from bench.nightly.probes import Probe, Split
from bench.nightly.variants import old_design_flow, prefix_rule_differences, run_flow, run_reference

# bench.subscriptions' own name: main sets it to INFO, so each run's line shows while the bench goes on.
log = logging.getLogger("bench.subscriptions")


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _stats(n: int, probes: list[Probe]) -> dict[str, Any]:
    secs = [p.seconds for p in probes]
    med = statistics.median(secs)
    out: dict[str, Any] = {
        "n": n,
        "seconds": [round(x, 3) for x in secs],
        "median_seconds": round(med, 3),
        "subs_per_s": round(n / med),
        "rss_peak_delta_mib": round(max(p.rss_peak_delta for p in probes) / 2**20, 1),
    }
    if probes[0].lock_url:
        out["lock_wait_share"] = [p.lock_wait_share for p in probes]
    return out


@dataclass
class Runner:
    """What the measured runs share: the data sets, the reference state of each, problems found, load averages."""

    base: str
    url: str
    datasets: dict[str, Dataset]
    run_date: dt.date
    batch: int
    conc: int
    refs: dict[str, State] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    loads: list[list[float]] = field(default_factory=list)

    @property
    def flow(self) -> str:
        return f"(b) flow {self.batch}x{self.conc}"

    def reference(self) -> None:
        run_reference(self.run_date)

    def default_flow(self) -> None:
        run_flow(self.run_date, None, None)

    def once(self, label: str, ds_key: str, fn: Callable[[], Any], trace: bool = False, locks: bool = False) -> Probe:
        """``fn`` probed on a fresh copy of data set ``ds_key``; what it left is checked against the reference."""
        from lib import db

        ds = self.datasets[ds_key]
        restore(self.base, ds)
        self.loads.append(_load())
        with Probe(trace=trace, lock_url=self.url if locks else None) as probe:
            fn()
        state = snapshot(db.get_engine())
        if ds_key not in self.refs:
            self.refs[ds_key] = state  # the first run on each data set is the reference (a)
        for p in differences(state, self.refs[ds_key]):
            self.problems.append(f"{label} (N={ds.n}, data {ds_key}): {p}")
        log.info(
            "%-34s N=%-7d %7.2f s  rss +%5.1f MiB%s%s  load %s",
            label,
            ds.n,
            probe.seconds,
            probe.rss_peak_delta / 2**20,
            f"  heap peak {probe.heap_peak / 2**20:.1f} MiB" if probe.heap_peak is not None else "",
            f"  lock-wait share {probe.lock_wait_share}" if locks else "",
            self.loads[-1],
        )
        return probe


def measure(
    args: argparse.Namespace, base: str, url: str, datasets: dict[str, Dataset], batch: int, conc: int
) -> dict[str, Any]:
    """Every variant at every N, then memory, the sweep and the old design at the largest N."""
    r = Runner(base, url, datasets, args.run_date, batch, conc)
    out: dict[str, Any] = {
        "n": args.n,
        "products": args.products,
        "run_date": r.run_date.isoformat(),
        "cpus": os.cpu_count(),
        "data": {k: d.info for k, d in datasets.items()},
        "defaults": {"batch_size": batch, "max_concurrency": conc},
        "repeats": args.repeats,
    }
    restore(base, datasets["old"])
    r.default_flow()  # warm-up: imports, first flow run against the harness; not measured

    by_n: dict[str, dict[str, Any]] = {}
    first_night: dict[str, dict[str, Any]] = {}
    for n in args.n:
        by_n[str(n)], night = _measure_size(r, args, n)
        if night is not None:
            first_night[str(n)] = night

    largest = str(args.n[-1])
    a_big, b_big = by_n[largest]["a_reference"], by_n[largest]["b_flow"]
    restore(base, datasets[largest])
    out["prefix_rule_would_differ_on"] = prefix_rule_differences(r.run_date)
    out["memory"] = _memory(r, by_n, largest)
    out["sweep"] = _sweep(r, args.sweep, largest, b_big)
    out["variants"] = {"a_reference": a_big, "b_flow": b_big}
    out["by_n"] = by_n
    out["ratios"] = {"b_over_a": {k: v["b_over_a"] for k, v in by_n.items()}}
    if args.first_night:
        out["first_night"] = {"ratio": {k: v["ratio"] for k, v in first_night.items()}, "by_n": first_night}
        out["ratios"]["first_night"] = out["first_night"]["ratio"]
    if not args.skip_old_design:
        c = _old_design(r, args.old_workers, int(largest))
        out["variants"]["c_task_per_row"] = c
        out["ratios"]["c_over_b"] = round(c["extrapolated_seconds_for_n"] / b_big["median_seconds"], 1)
    out["target_met"] = all(x <= 1.5 for x in out["ratios"]["b_over_a"].values()) and all(
        x <= 1.2 for x in out["ratios"].get("first_night", {}).values()
    )
    out["load_average_1m_before_each_run"] = {"min": min(x[0] for x in r.loads), "max": max(x[0] for x in r.loads)}
    out["problems"] = r.problems
    return out


def _measure_size(r: Runner, args: argparse.Namespace, n: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(a), (b) and the first night at one N: its ``by_n`` entry, and its first-night entry (None without one)."""
    key, fkey = str(n), f"{n}-first-night"
    a: list[Probe] = []
    b: list[Probe] = []
    f: list[Probe] = []
    if args.first_night:
        r.once("(a) reference SQL, first night", fkey, r.reference)  # the first night's data reference
    for _ in range(args.repeats):  # interleaved, so that a change of load hits every variant alike
        a.append(r.once("(a) reference SQL", key, r.reference))
        b.append(r.once(r.flow, key, r.default_flow, locks=True))
        if args.first_night:
            f.append(r.once(f"{r.flow}, first night", fkey, r.default_flow))
    sa, sb = _stats(n, a), _stats(n, b)
    sb["heap_peak_mib"] = round(r.once(f"{r.flow}, traced", key, r.default_flow, trace=True).heap_peak / 2**20, 2)
    entry: dict[str, Any] = {
        "a_reference": sa,
        "b_flow": sb,
        "b_over_a": round(sb["median_seconds"] / sa["median_seconds"], 2),
        "b_over_a_per_repeat": [round(y.seconds / x.seconds, 2) for x, y in zip(a, b, strict=True)],
    }
    night = None
    if args.first_night:
        sf = _stats(n, f)
        night = {
            "history_orders": r.datasets[key].info["history_orders"],
            "b_flow_with_history": sb["median_seconds"],
            "b_flow_first_night": sf,
            "ratio": round(sf["median_seconds"] / sb["median_seconds"], 2),
            "ratio_per_repeat": [round(y.seconds / x.seconds, 2) for x, y in zip(b, f, strict=True)],
        }
    if args.split:
        entry["split"] = _split(r, key, n)
    return entry, night


def _split(r: Runner, key: str, n: int) -> dict[str, Any]:
    """One untimed, instrumented flow run at N: where its time goes."""
    from lib import db

    split = Split()
    restore(r.base, r.datasets[key])
    r.loads.append(_load())
    with split.attached(db.get_engine()):
        started = time.perf_counter()
        r.default_flow()
        wall = time.perf_counter() - started
    report = split.report(wall)
    log.info("split at N=%d: %s", n, json.dumps(report))
    return report


def _memory(r: Runner, by_n: dict[str, dict[str, Any]], largest: str) -> dict[str, Any]:
    """Heap peaks and RSS growth of (b) by N (the quarter N too, when there is one); (a)'s heap at the largest N."""
    # Memory of (a), in an untimed run with tracemalloc on (it slows allocation-heavy code down).
    traced = r.once("(a) reference SQL, traced", largest, r.reference, trace=True)
    by_n[largest]["a_reference"]["heap_peak_mib"] = round(traced.heap_peak / 2**20, 2)
    heap = {k: v["b_flow"]["heap_peak_mib"] for k, v in by_n.items()}
    rss = {k: v["b_flow"]["rss_peak_delta_mib"] for k, v in by_n.items()}
    if "quarter" in r.datasets:
        r.once("(a) reference SQL", "quarter", r.reference)
        q = r.once(f"{r.flow}, traced", "quarter", r.default_flow, trace=True)
        qn = str(r.datasets["quarter"].n)
        heap[qn], rss[qn] = round(q.heap_peak / 2**20, 2), round(q.rss_peak_delta / 2**20, 1)
    return {
        "measure": "tracemalloc peak of the Python heap during an untimed run (C buffers of libpq not included); "
        "rss_peak_delta_mib: peak RSS growth sampled every 20 ms from /proc/self/statm",
        "flow_heap_peak_mib": dict(sorted(heap.items(), key=lambda kv: int(kv[0]))),
        "flow_rss_peak_delta_mib": dict(sorted(rss.items(), key=lambda kv: int(kv[0]))),
    }


def _sweep(r: Runner, specs: str, largest: str, b_big: dict[str, Any]) -> list[dict[str, Any]]:
    """(b) once per BATCHxCONCURRENCY of ``specs`` at the largest N, with the default's figures; fastest first."""
    sweep = []
    for spec in filter(None, (x.strip() for x in specs.split(","))):
        bs, cc = (int(v) for v in spec.split("x"))
        probe = r.once(f"(b) flow {bs}x{cc}", largest, lambda bs=bs, cc=cc: run_flow(r.run_date, bs, cc), locks=True)
        sweep.append({"batch_size": bs, "max_concurrency": cc, **_stats(int(largest), [probe])})
    sweep.append({"batch_size": r.batch, "max_concurrency": r.conc, **b_big})
    return sorted(sweep, key=lambda x: x["median_seconds"])


def _old_design(r: Runner, workers: int, largest_n: int) -> dict[str, Any]:
    """(c) at --old-n, its time extrapolated linearly to the largest N."""
    old_flow = old_design_flow(workers)
    r.once("(a) reference SQL", "old", r.reference)
    probe = r.once(f"(c) task per row, {workers} threads", "old", lambda: old_flow(r.run_date))
    c = _stats(r.datasets["old"].n, [probe])
    c.update(
        workers=workers,
        extrapolated=c["n"] < largest_n,
        extrapolated_seconds_for_n=round(c["median_seconds"] * largest_n / c["n"], 1),
    )
    return c
