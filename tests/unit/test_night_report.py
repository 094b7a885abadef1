"""The nightly artifact: headline and small tables an operator reads at a glance (pure)."""

import datetime as dt

import pandas as pd

from lib import night_report

GROUPS = pd.DataFrame(
    [
        ("created", "monthly", 7, 3, 5, 12_345_600),
        ("created", "weekly", 8, 1, 1, 49_900),
        ("out_of_stock", "weekly", 7, 2, 0, 0),
    ],
    columns=["outcome", "frequency", "product_id", "subscriptions", "units", "revenue_paise"],
)


def test_headline_says_created_out_of_stock_failed_and_stopped_early():
    """One line with the counts and rupees; 'stopped early' appears only when the soft limit cut the run."""
    stats = {"created": 4, "out_of_stock": 2, "failed": 0, "revenue_inr": 123_956.0, "stopped_early": True}
    line = night_report.headline(stats, dt.date(2026, 11, 28), dry_run=False)
    assert line.startswith("2026-11-28: created 4 orders (₹1,23,956.00), 2 out of stock, 0 failed")
    assert "stopped early" in line
    assert "stopped early" not in night_report.headline(
        stats | {"stopped_early": False}, dt.date(2026, 11, 28), dry_run=False
    )


def test_tables_per_dimension_with_names_and_indian_grouping():
    """Outcomes in lifecycle order, frequencies in cadence order, products by name with ₹ amounts."""
    ids = night_report.top_product_ids(GROUPS)
    assert ids == [7, 8]
    text = night_report.render(
        GROUPS, {"created": 4}, {7: "Amla Juice 500 ml", 8: "Neem Soap"}, [10.0, 30.0], dt.date(2026, 11, 28)
    )
    assert "| created | 4 | 6 | ₹1,23,955.00 |" in text
    assert text.index("| weekly |") < text.index("| monthly |")
    assert "| Amla Juice 500 ml | 3 | 5 | ₹1,23,456.00 |" in text and "| Neem Soap | 1 | 1 | ₹499.00 |" in text
    assert "| batch p50 ms | batch p95 ms |" in text


def test_top_products_are_listed_most_units_first_whatever_order_the_names_came_in():
    """Names come from an unordered query; the table still lists the product with most units first."""
    names = {8: "Neem Soap", 7: "Amla Juice 500 ml"}
    text = night_report.render(GROUPS, {"created": 4}, names, [], dt.date(2026, 11, 28))
    assert text.index("| Amla Juice 500 ml |") < text.index("| Neem Soap |")


def test_an_empty_night_still_renders():
    """A night with nothing due renders its headline and says none in each table."""
    empty = pd.DataFrame(columns=GROUPS.columns)
    text = night_report.render(empty, {}, {}, [], dt.date(2026, 11, 28))
    assert "created 0 orders" in text and "_none_" in text
