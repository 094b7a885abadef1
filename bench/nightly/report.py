"""Printing the nightly benchmark's results: a table per part on stderr, then the JSON object on stdout."""

from __future__ import annotations

import json
import sys
from typing import Any


def print_report(r: dict[str, Any]) -> None:
    """The tables on stderr, the JSON object on stdout."""
    err = sys.stderr
    _print_variants(r)
    print(f"\nflow heap peak by N: {r['memory']['flow_heap_peak_mib']} MiB (tracemalloc)", file=err)
    _print_splits(r)
    _print_sweep(r)
    print(f"\nbench took {r['bench_seconds']} s", file=err)
    print(json.dumps(r, indent=2, default=str))


def _variant_rows(r: dict[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    """(label, figures, note) per variant and N, in the order measured; (c) last."""
    v = r["variants"]
    largest = str(r["n"][-1])
    rows: list[tuple[str, dict[str, Any], str]] = []
    for key, x in r["by_n"].items():
        rows.append(("(a) reference: one transaction of SQL", x["a_reference"], ""))
        rows.append(
            (
                f"(b) process-due-subscriptions {r['defaults']['batch_size']}x{r['defaults']['max_concurrency']}",
                x["b_flow"],
                f"b/a {x['b_over_a']}",
            )
        )
        if key in r.get("first_night", {}).get("by_n", {}):
            fn = r["first_night"]["by_n"][key]
            rows.append(("(b) the same, first night (--history 0)", fn["b_flow_first_night"], f"ratio {fn['ratio']}"))
    if "c_task_per_row" in v:
        c = v["c_task_per_row"]
        rows.append(
            (
                f"(c) one task per row ({c['workers']} threads)",
                c,
                f"c/b {r['ratios']['c_over_b']} (measured at N={c['n']}, extrapolated to N={largest})",
            )
        )
    return rows


def _print_variants(r: dict[str, Any]) -> None:
    err = sys.stderr
    largest = str(r["n"][-1])
    print(
        f"\nN = {', '.join(f'{n:,}' for n in r['n'])} due subscriptions over {r['products']} products, "
        f"run date {r['run_date']}, {r['cpus']} CPUs, PostgreSQL {r['pg'].get('server_version')}, "
        f"medians of {r['repeats']}, load average (1 min) {r['load_average_1m_before_each_run']}",
        file=err,
    )
    print(f"{'variant':<46} {'N':>9} {'seconds':>9} {'subs/s':>8} {'heap MiB':>9} {'RSS+ MiB':>9}  note", file=err)
    for label, x, note in _variant_rows(r):
        secs = x.get("extrapolated_seconds_for_n", x["median_seconds"])
        n = int(largest) if "extrapolated_seconds_for_n" in x else x["n"]
        heap = x.get("heap_peak_mib")
        print(
            f"{label:<46} {n:>9} {secs:>9.2f} {x['subs_per_s']:>8} {heap if heap is not None else '-':>9} "
            f"{x['rss_peak_delta_mib']:>9}  {note}",
            file=err,
        )


def _print_splits(r: dict[str, Any]) -> None:
    err = sys.stderr
    for key, x in r["by_n"].items():
        if "split" in x:
            sp = x["split"]
            print(
                f"\nsplit at N={key} (one instrumented run, thread-seconds over {sp['lanes']} lanes, "
                f"{sp['batches']} batches, {sp['statements_per_batch']} statements per batch): "
                f"flow {sp['flow_wall_s']} s, slowest lane {sp['lane_wall_max_s']} s, "
                f"Prefect and report {sp['prefect_and_report_s']} s",
                file=err,
            )
            for part, secs in sp["parts_thread_s"].items():
                print(f"  {part:<40} {secs:>9.2f}", file=err)
            for cls, (secs, count) in sp["sql_thread_s_and_count"].items():
                print(f"    {cls:<38} {secs:>9.2f}  ({count} statements)", file=err)


def _print_sweep(r: dict[str, Any]) -> None:
    err = sys.stderr
    print(f"\n{'batch x concurrency':<22} {'seconds':>9} {'subs/s':>8} {'lock-wait share':>16}", file=err)
    for x in r["sweep"]:
        print(
            f"{str(x['batch_size']) + ' x ' + str(x['max_concurrency']):<22} {x['median_seconds']:>9.2f} "
            f"{x['subs_per_s']:>8} {x.get('lock_wait_share')!s:>16}",
            file=err,
        )
