"""The night's statistics: outcomes counted by (outcome, frequency, product) and the tables made of them.

Pure pandas over lib.subscriptions.Outcome values, and one query (``run_outcomes``) that
reads a finished run's counts back from the database in the same shape.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pandas as pd
from sqlalchemy import text
from sqlalchemy.orm import Session

from lib.subscriptions import Outcome

SUMMARY_KEYS = ["outcome", "frequency", "product_id"]
SUMMARY_COLUMNS = [*SUMMARY_KEYS, "subscriptions", "units", "revenue_paise"]


class Tally:
    """Counts, units and revenue by (outcome, frequency, product), kept in a plain dict.

    A lane adds every batch's outcomes here (microseconds per outcome; a pandas groupby
    per batch cost ~8 ms) and builds the DataFrame once, at the end. Bounded by products
    x outcomes x frequencies, not by subscriptions.
    """

    def __init__(self, outcomes: Iterable[Outcome] = ()) -> None:
        self._sums: dict[tuple[str, str, int], list[int]] = {}
        self.add(outcomes)

    def add(self, outcomes: Iterable[Outcome]) -> None:
        sums = self._sums
        for o in outcomes:
            key = (o.outcome, o.frequency, o.product_id)
            row = sums.get(key)
            if row is None:
                sums[key] = [1, o.units, o.revenue_paise]
            else:
                row[0] += 1
                row[1] += o.units
                row[2] += o.revenue_paise

    def frame(self) -> pd.DataFrame:
        """The table summarize() makes: one row per (outcome, frequency, product), in key order."""
        if not self._sums:
            return pd.DataFrame(columns=SUMMARY_COLUMNS)
        return pd.DataFrame([(*k, *v) for k, v in sorted(self._sums.items())], columns=SUMMARY_COLUMNS)


def summarize(outcomes: Sequence[Outcome], into: pd.DataFrame | None = None) -> pd.DataFrame:
    """Counts, units and revenue by (outcome, frequency, product); merged into ``into`` if given.

    The result is bounded by products x outcomes x frequencies, not by subscriptions,
    so a lane can keep merging without its memory growing with the night's size.
    """
    frame = pd.DataFrame(
        [(o.outcome, o.frequency, o.product_id, 1, o.units, o.revenue_paise) for o in outcomes],
        columns=SUMMARY_COLUMNS,
    )
    if into is not None and not into.empty:
        frame = pd.concat([into, frame], ignore_index=True) if not frame.empty else into
    if frame.empty:
        return frame
    return frame.groupby(SUMMARY_KEYS, as_index=False)[["subscriptions", "units", "revenue_paise"]].sum()


def night_tables(groups: pd.DataFrame, batch_ms: Sequence[float], top_products: int = 20) -> pd.DataFrame:
    """One long table for the artifact: rows by outcome, by frequency, top products, batch timings."""
    parts = []
    if not groups.empty:
        for dim in ("outcome", "frequency"):
            t = groups.groupby(dim, as_index=False)[["subscriptions", "units", "revenue_paise"]].sum()
            parts.append(t.assign(dimension=dim, key=t[dim].astype(str)))
        created = groups[groups["outcome"] == "created"]
        t = (
            created.groupby("product_id", as_index=False)[["subscriptions", "units", "revenue_paise"]]
            .sum()
            .sort_values(["units", "product_id"], ascending=[False, True])
            .head(top_products)
        )
        parts.append(t.assign(dimension="product (top by units)", key=t["product_id"].astype(str)))
    table = (
        pd.concat(parts, ignore_index=True)
        if parts
        else pd.DataFrame(columns=["dimension", "key", "subscriptions", "units", "revenue_paise"])
    )
    table["revenue_inr"] = (table["revenue_paise"] / 100).round(2)
    table = table[["dimension", "key", "subscriptions", "units", "revenue_inr"]]
    if len(batch_ms):
        s = pd.Series(batch_ms, dtype=float)
        timing = pd.DataFrame(
            {
                "dimension": "batch duration (ms)",
                "key": ["batches", "p50", "p95", "max"],
                "subscriptions": [len(s), None, None, None],
                "units": [None, round(s.median(), 1), round(s.quantile(0.95), 1), round(s.max(), 1)],
                "revenue_inr": None,
            }
        )
        table = pd.concat([table, timing], ignore_index=True)
    return table


def headline(groups: pd.DataFrame) -> dict[str, int | float]:
    """The numbers a flow returns: subscriptions by outcome, units and revenue created."""
    out: dict[str, int | float] = {k: 0 for k in ("created", "out_of_stock", "inactive", "failed")}
    if not groups.empty:
        for outcome, n in groups.groupby("outcome")["subscriptions"].sum().items():
            out[str(outcome)] = int(n)
        created = groups[groups["outcome"] == "created"]
        out["units"] = int(created["units"].sum())
        out["revenue_inr"] = round(float(created["revenue_paise"].sum()) / 100, 2)
    else:
        out.update(units=0, revenue_inr=0.0)
    return out


# Aggregated in SQL so the summary stays products x outcomes x frequencies whatever the night's size.
# Units and revenue count only orders this run made (reason IS NULL), as the in-process summary does.
_RUN_OUTCOMES = text(
    """
SELECT o.outcome, s.frequency, s.product_id, count(*) AS subscriptions,
       CAST(coalesce(sum(i.units), 0) AS bigint) AS units,
       CAST(coalesce(sum(i.revenue_paise), 0) AS bigint) AS revenue_paise
FROM subscription_outcomes o
JOIN subscriptions s ON s.id = o.subscription_id
LEFT JOIN LATERAL (
    SELECT sum(quantity) AS units, sum(quantity * unit_price_paise) AS revenue_paise
    FROM order_items WHERE order_id = o.order_id
) i ON o.outcome = 'created' AND o.reason IS NULL
WHERE o.run_id = :run_id
GROUP BY o.outcome, s.frequency, s.product_id
"""
)


def run_outcomes(session: Session, run_id: str) -> pd.DataFrame:
    """The outcomes a run recorded (its lanes and lane runs included), as ``summarize`` groups them."""
    rows = session.execute(_RUN_OUTCOMES, {"run_id": run_id}).all()
    return summarize([], pd.DataFrame([tuple(r) for r in rows], columns=SUMMARY_COLUMNS))
