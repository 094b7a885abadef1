"""Builders for test rows: say what matters (due date, stock), default the rest.

Each takes a SQLAlchemy Engine or Connection and returns the new row's id.
"""

from __future__ import annotations

import datetime as dt
import itertools

from sqlalchemy import text

_seq = itertools.count(1)


def today() -> dt.date:
    """Today in UTC, from the clock the flows read (``flows.subscriptions._today``): tests take every date
    from here, so none depends on the calendar (``make test-clock`` moves this clock a year ahead)."""
    return dt.datetime.now(dt.UTC).date()


def month_end(months_ahead: int = 0) -> dt.date:
    """The last day of the month ``months_ahead`` months after today's (for anchor-day cases)."""
    first = today().replace(day=1)
    year, month = divmod(first.month - 1 + months_ahead + 1, 12)
    return dt.date(first.year + year, month + 1, 1) - dt.timedelta(days=1)


def _exec(bind, sql: str, params: dict):
    if hasattr(bind, "begin") and not hasattr(bind, "in_transaction"):
        with bind.begin() as conn:
            return conn.execute(text(sql), params).scalar()
    return bind.execute(text(sql), params).scalar()


def make_customer(
    bind,
    name: str = "Priya Sharma",
    email: str | None = None,
    phone: str | None = "+919876543210",
    email_opt_in: bool = True,
    sms_opt_in: bool = True,
) -> int:
    n = next(_seq)
    return _exec(
        bind,
        "INSERT INTO customers (name, email, phone, email_opt_in, sms_opt_in) "
        "VALUES (:n, :e, :p, :eo, :so) RETURNING id",
        {"n": name, "e": email or f"customer{n}@example.in", "p": phone, "eo": email_opt_in, "so": sms_opt_in},
    )


def make_product(bind, stock: int = 100, price_paise: int = 129_900, name: str = "Tulsi Green Tea 100 g") -> int:
    n = next(_seq)
    return _exec(
        bind,
        "INSERT INTO products (sku, name, price_paise, stock) VALUES (:s, :n, :p, :st) RETURNING id",
        {"s": f"T-{n:06d}", "n": name, "p": price_paise, "st": stock},
    )


def make_subscription(
    bind,
    *,
    customer_id: int | None = None,
    product_id: int | None = None,
    due: dt.date | None = None,
    frequency: str = "monthly",
    quantity: int = 1,
    status: str = "active",
    anchor_day: int | None = None,
    stock: int = 100,
    razorpay_subscription_id: str | None = None,
) -> int:
    """An active monthly subscription due ``due`` (default today)."""
    due = due or today()
    customer_id = customer_id or make_customer(bind)
    product_id = product_id or make_product(bind, stock=stock)
    return _exec(
        bind,
        "INSERT INTO subscriptions (customer_id, product_id, quantity, frequency, status, "
        "next_delivery_date, anchor_day, razorpay_subscription_id) "
        "VALUES (:c, :p, :q, :f, :s, :d, :a, :r) RETURNING id",
        {
            "c": customer_id,
            "p": product_id,
            "q": quantity,
            "f": frequency,
            "s": status,
            "d": due,
            "a": anchor_day or due.day,
            "r": razorpay_subscription_id,
        },
    )


def make_order(
    bind,
    *,
    customer_id: int | None = None,
    product_id: int | None = None,
    quantity: int = 1,
    subscription_id: int | None = None,
    delivery_date: dt.date | None = None,
    unit_price_paise: int = 129_900,
) -> int:
    customer_id = customer_id or make_customer(bind)
    product_id = product_id or make_product(bind, price_paise=unit_price_paise)
    order_id = _exec(
        bind,
        "INSERT INTO orders (customer_id, subscription_id, delivery_date, total_paise) "
        "VALUES (:c, :s, :d, :t) RETURNING id",
        {"c": customer_id, "s": subscription_id, "d": delivery_date, "t": unit_price_paise * quantity},
    )
    _exec(
        bind,
        "INSERT INTO order_items (order_id, product_id, quantity, unit_price_paise) "
        "VALUES (:o, :p, :q, :u) RETURNING id",
        {"o": order_id, "p": product_id, "q": quantity, "u": unit_price_paise},
    )
    return order_id


# ---- cleanup: carts, audit logs, sessions (ages relative to now, in UTC) ----------------


def _ago(days: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(days=days)


def make_cart(bind, *, age_days: float, items: int = 0, product_id: int | None = None) -> int:
    """A cart last updated ``age_days`` ago with ``items`` lines (a product is made if none is given)."""
    cart_id = _exec(
        bind, "INSERT INTO carts (created_at, updated_at) VALUES (:t, :t) RETURNING id", {"t": _ago(age_days)}
    )
    if items:
        product_id = product_id or make_product(bind)
        for _ in range(items):
            _exec(
                bind,
                "INSERT INTO cart_items (cart_id, product_id, quantity) VALUES (:c, :p, 1) RETURNING id",
                {"c": cart_id, "p": product_id},
            )
    return cart_id


def make_audit_log(bind, *, age_days: float, action: str = "update_address") -> int:
    """An audit log row written ``age_days`` ago."""
    return _exec(
        bind,
        "INSERT INTO audit_logs (actor, action, entity, entity_id, created_at) "
        "VALUES ('customer', :a, 'order', '1', :t) RETURNING id",
        {"a": action, "t": _ago(age_days)},
    )


def make_user_session(bind, *, inactive_days: float) -> int:
    """A user session last active ``inactive_days`` ago."""
    n = next(_seq)
    return _exec(
        bind,
        "INSERT INTO user_sessions (session_key_hash, last_active_at) VALUES (:h, :t) RETURNING id",
        {"h": f"{n:064x}", "t": _ago(inactive_days)},
    )


def db_now(bind=None) -> dt.datetime:
    """The database's clock (``now()``): the one that stamps delivery-log rows, so replay windows are taken from it."""
    if bind is None:
        from lib.db import get_engine

        bind = get_engine()
    return _exec(bind, "SELECT now()", {})


def count_rows(bind, table: str) -> int:
    """How many rows ``table`` holds (test helper; table names are our own)."""
    return _exec(bind, f"SELECT count(*) FROM {table}", {})
