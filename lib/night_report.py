"""The nightly run's artifact: a one-line headline and one small table per dimension, as markdown.

``render`` takes the run's summary DataFrame (lib.subscription_stats.summarize: subscriptions, units
and revenue by outcome, frequency and product), the product names, batch timings and what
happened to payments and confirmations, and returns what an operator reads at a glance in the
Prefect UI: outcomes, frequencies, the top products by name, money as ₹ with Indian grouping.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from sqlalchemy import text
from sqlalchemy.orm import Session

from lib import markdown as md
from lib.notify.templates import format_inr

OUTCOME_ORDER = ("created", "out_of_stock", "inactive", "failed")
FREQUENCY_ORDER = ("weekly", "biweekly", "monthly", "quarterly")


def product_names(session: Session, product_ids: Sequence[int]) -> dict[int, str]:
    """Names of the given products (one query)."""
    if not product_ids:
        return {}
    rows = session.execute(text("SELECT id, name FROM products WHERE id = ANY(:ids)"), {"ids": list(product_ids)})
    return {int(i): str(n) for i, n in rows}


def top_product_ids(groups: pd.DataFrame, top: int = 10) -> list[int]:
    """Products with the most units ordered this run (ties by id), for the product table."""
    created = groups[groups["outcome"] == "created"] if not groups.empty else groups
    if created.empty:
        return []
    units = created.groupby("product_id")["units"].sum().reset_index()
    units = units.sort_values(["units", "product_id"], ascending=[False, True]).head(top)
    return [int(p) for p in units["product_id"]]


def _by(groups: pd.DataFrame, dim: str, order: Sequence[str]) -> list[dict[str, Any]]:
    if groups.empty:
        return []
    t = groups.groupby(dim, as_index=False)[["subscriptions", "units", "revenue_paise"]].sum()
    t["rank"] = t[dim].map({k: i for i, k in enumerate(order)}).fillna(len(order))
    t = t.sort_values(["rank", dim])
    return [
        {
            dim: r[dim],
            "subscriptions": int(r["subscriptions"]),
            "units": int(r["units"]),
            "revenue": format_inr(int(r["revenue_paise"])),
        }
        for r in t.to_dict(orient="records")
    ]


def _products(groups: pd.DataFrame, names: Mapping[int, str], ids: Sequence[int]) -> list[dict[str, Any]]:
    created = groups[groups["outcome"] == "created"] if not groups.empty else groups
    rows = []
    for pid in ids:
        g = created[created["product_id"] == pid]
        units = int(g["units"].sum())
        rows.append(
            (
                (-units, pid),
                {
                    "product": names.get(pid, f"#{pid}"),
                    "subscriptions": int(g["subscriptions"].sum()),
                    "units": units,
                    "revenue": format_inr(int(g["revenue_paise"].sum())),
                },
            )
        )
    # Most units first, as top_product_ids chose them (``ids`` may come in any order).
    return [row for _, row in sorted(rows, key=lambda r: r[0])]


def headline(stats: Mapping[str, Any], run_date: dt.date, *, dry_run: bool) -> str:
    """One line: created / out of stock / failed / stopped early, and the revenue."""
    created = int(stats.get("created", 0))
    parts = [
        f"{run_date}: {'would create' if dry_run else 'created'} {created:,} orders "
        f"({format_inr(round(float(stats.get('revenue_inr', 0)) * 100))})",
        f"{int(stats.get('out_of_stock', 0)):,} out of stock",
        f"{int(stats.get('failed', 0)):,} failed",
    ]
    if stats.get("stopped_early"):
        parts.append("stopped early at the soft limit: the rest stays due")
    return ", ".join(parts)


def render(
    groups: pd.DataFrame,
    stats: Mapping[str, Any],
    names: Mapping[int, str],
    batch_ms: Sequence[float],
    run_date: dt.date,
    *,
    dry_run: bool = False,
) -> str:
    """The whole artifact as markdown."""
    sections = [
        md.section(
            "By outcome",
            md.table(_by(groups, "outcome", OUTCOME_ORDER), ["outcome", "subscriptions", "units", "revenue"]),
        ),
        md.section(
            "By frequency",
            md.table(_by(groups, "frequency", FREQUENCY_ORDER), ["frequency", "subscriptions", "units", "revenue"]),
        ),
        md.section(
            "Top products (by units ordered)",
            md.table(_products(groups, names, list(names)), ["product", "subscriptions", "units", "revenue"]),
        ),
    ]
    extra: dict[str, Any] = {}
    if paid := stats.get("payments_attached"):
        extra |= {"payments applied": paid.get("applied", 0), "payments held": paid.get("held", 0)}
    for key in ("confirmations_requested", "batches", "isolated_batches"):
        if key in stats:
            extra[key.replace("_", " ")] = stats[key]
    if len(batch_ms):
        s = pd.Series(batch_ms, dtype=float)
        extra |= {"batch p50 ms": round(float(s.median()), 1), "batch p95 ms": round(float(s.quantile(0.95)), 1)}
    if extra:
        sections.append(md.section("Run", md.table([extra], list(extra))))
    if failed := stats.get("confirmations_failed"):
        sections.append(md.section("Confirmations", f"Not all sent: {failed}"))
    return md.document(headline(stats, run_date, dry_run=dry_run), *sections)
