"""Realistic demo data for development and benchmarks, loaded with COPY.

Indian names and +91 phones, products with some out of stock, subscriptions of every
frequency (some due today, some overdue, some paused or cancelled), carts of every
age, audit logs and sessions. Deterministic for a given seed. Tokens go to Redis
through lib.tokens, the same layout the backend uses.
"""

from __future__ import annotations

import calendar
import datetime as dt
import io
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text

log = logging.getLogger(__name__)

FIRST = [
    "Aarav",
    "Vivaan",
    "Aditya",
    "Vihaan",
    "Arjun",
    "Sai",
    "Reyansh",
    "Ayaan",
    "Krishna",
    "Ishaan",
    "Ananya",
    "Diya",
    "Aadhya",
    "Saanvi",
    "Pari",
    "Anika",
    "Navya",
    "Myra",
    "Ira",
    "Kavya",
    "Priya",
    "Neha",
    "Rohan",
    "Rahul",
    "Sneha",
    "Pooja",
    "Karthik",
    "Lakshmi",
    "Meera",
    "Farhan",
    "Zoya",
    "Gurpreet",
    "Harpreet",
    "Tenzin",
    "Anjali",
    "Deepak",
    "Suresh",
    "Ramesh",
    "Divya",
    "Nikhil",
]
LAST = [
    "Sharma",
    "Verma",
    "Iyer",
    "Nair",
    "Reddy",
    "Patel",
    "Shah",
    "Gupta",
    "Singh",
    "Kaur",
    "Khan",
    "Menon",
    "Pillai",
    "Rao",
    "Das",
    "Bose",
    "Banerjee",
    "Chatterjee",
    "Mukherjee",
    "Joshi",
    "Kulkarni",
    "Deshpande",
    "Naidu",
    "Gill",
    "Sethi",
    "Kapoor",
    "Malhotra",
]
PRODUCTS = [
    "Ashwagandha Capsules",
    "Tulsi Green Tea",
    "Neem Face Wash",
    "Amla Juice",
    "Triphala Churna",
    "Cold-Pressed Coconut Oil",
    "Moringa Powder",
    "Turmeric Latte Mix",
    "Brahmi Hair Oil",
    "Shilajit Resin",
    "Chyawanprash",
    "Aloe Vera Gel",
    "Kumkumadi Tailam",
    "Giloy Tablets",
    "Jaggery Powder",
    "Sattu Flour",
    "A2 Cow Ghee",
    "Wild Forest Honey",
    "Multani Mitti",
    "Sandalwood Soap",
]
FREQUENCY_WEIGHTS = {"weekly": 30, "biweekly": 25, "monthly": 35, "quarterly": 10}


@dataclass(frozen=True)
class SeedCounts:
    customers: int = 1000
    products: int = 200
    subscriptions: int = 2000
    carts: int = 1000
    tokens: int = 1000
    audit_logs: int = 2000
    sessions: int = 1000


def _tsv(value: object) -> str:
    if value is None:
        return r"\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    return str(value).replace("\\", "\\\\").replace("\t", " ").replace("\n", " ")


def copy_rows(conn: Connection, table: str, columns: Iterable[str], rows: Iterable[tuple], chunk: int = 50_000) -> int:
    """COPY rows into table in chunks; returns the number of rows written."""
    cols = ", ".join(columns)
    raw = conn.connection.driver_connection  # psycopg2 connection inside the SQLAlchemy transaction
    buf = io.StringIO()
    n = 0

    def flush() -> None:
        buf.seek(0)
        with raw.cursor() as cur:
            cur.copy_expert(f"COPY {table} ({cols}) FROM STDIN", buf)
        buf.seek(0)
        buf.truncate()

    for row in rows:
        buf.write("\t".join(_tsv(v) for v in row))
        buf.write("\n")
        n += 1
        if n % chunk == 0:
            flush()
    if buf.tell():
        flush()
    return n


def _next_id(conn: Connection, table: str) -> int:
    return int(conn.execute(text(f"SELECT coalesce(max(id), 0) + 1 FROM {table}")).scalar_one())


def _fix_sequence(conn: Connection, table: str) -> None:
    conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), coalesce(max(id), 1)) FROM {table}"))


def _days_in_month(d: dt.date) -> int:
    return calendar.monthrange(d.year, d.month)[1]


@dataclass
class _Ctx:
    """What every table's seeding step shares: the connection, the random source, the clock, the first ids."""

    conn: Connection
    rng: random.Random
    today: dt.date
    now: dt.datetime
    customers: int  # how many customers and products the child rows may point at
    products: int
    first: dict[str, int]  # table -> first id of this seed (ids continue after existing rows)

    def customer(self) -> int:
        return self.first["customers"] + self.rng.randrange(self.customers)

    def product(self) -> int:
        return self.first["products"] + self.rng.randrange(self.products)


def _customers(ctx: _Ctx, n: int) -> int:
    def rows() -> Iterator[tuple[Any, ...]]:
        for i in range(n):
            cid = ctx.first["customers"] + i
            first, last = ctx.rng.choice(FIRST), ctx.rng.choice(LAST)
            phone = f"+91{ctx.rng.choice('6789')}{ctx.rng.randrange(10**8, 10**9)}"
            seen = ctx.now - dt.timedelta(days=ctx.rng.randrange(0, 120))
            email = f"{first}.{last}.{cid}@example.in".lower()
            yield (cid, f"{first} {last}", email, phone, ctx.rng.random() > 0.05, ctx.rng.random() > 0.15, seen)

    columns = ("id", "name", "email", "phone", "email_opt_in", "sms_opt_in", "last_seen_at")
    return copy_rows(ctx.conn, "customers", columns, rows())


def _products(ctx: _Ctx, n: int) -> int:
    def rows() -> Iterator[tuple[Any, ...]]:
        for i in range(n):
            pid = ctx.first["products"] + i
            base = PRODUCTS[i % len(PRODUCTS)]
            size = ("100 g", "250 g", "500 ml", "60 caps", "1 kg")[i // len(PRODUCTS) % 5]
            stock = 0 if ctx.rng.random() < 0.05 else ctx.rng.randrange(20, 5000)
            yield (pid, f"IS-{pid:06d}", f"{base} {size}", ctx.rng.randrange(99, 2499) * 100, stock)

    return copy_rows(ctx.conn, "products", ("id", "sku", "name", "price_paise", "stock"), rows())


def _subscriptions(ctx: _Ctx, n: int) -> int:
    """Every frequency; ~10 % due today, ~5 % overdue by 1-3 days, 15 % paused or cancelled."""
    freqs, weights = zip(*FREQUENCY_WEIGHTS.items(), strict=True)

    def rows() -> Iterator[tuple[Any, ...]]:
        for i in range(n):
            roll = ctx.rng.random()
            if roll < 0.10:
                nxt = ctx.today
            elif roll < 0.15:
                nxt = ctx.today - dt.timedelta(days=ctx.rng.randrange(1, 4))
            else:
                nxt = ctx.today + dt.timedelta(days=ctx.rng.randrange(1, 90))
            status = "active" if ctx.rng.random() < 0.85 else ctx.rng.choice(("paused", "cancelled"))
            anchor = 31 if nxt.day == _days_in_month(nxt) and ctx.rng.random() < 0.5 else nxt.day
            quantity, frequency = ctx.rng.choice((1, 1, 1, 2, 3)), ctx.rng.choices(freqs, weights)[0]
            yield (
                ctx.first["subscriptions"] + i,
                ctx.customer(),
                ctx.product(),
                quantity,
                frequency,
                status,
                nxt,
                anchor,
            )

    columns = ("id", "customer_id", "product_id", "quantity", "frequency", "status", "next_delivery_date", "anchor_day")
    return copy_rows(ctx.conn, "subscriptions", columns, rows())


def _carts(ctx: _Ctx, n: int) -> tuple[int, int]:
    """Carts of every age (0-120 days), ~70 % with 1-3 items; returns (carts, items)."""
    items: list[tuple[Any, ...]] = []

    def rows() -> Iterator[tuple[Any, ...]]:
        for i in range(n):
            kid = ctx.first["carts"] + i
            updated = ctx.now - dt.timedelta(days=ctx.rng.randrange(0, 120), minutes=ctx.rng.randrange(0, 1440))
            if ctx.rng.random() > 0.3:
                for _ in range(ctx.rng.randrange(1, 4)):
                    items.append((kid, ctx.product(), ctx.rng.randrange(1, 4), updated))
            customer = ctx.customer() if ctx.rng.random() < 0.6 else None
            yield (kid, customer, updated - dt.timedelta(hours=ctx.rng.randrange(0, 48)), updated)

    carts = copy_rows(ctx.conn, "carts", ("id", "customer_id", "created_at", "updated_at"), rows())
    return carts, copy_rows(ctx.conn, "cart_items", ("cart_id", "product_id", "quantity", "added_at"), items)


def _audit_logs(ctx: _Ctx, n: int) -> int:
    actions = ("login", "update_address", "place_order", "cancel_subscription", "refund", "change_price")

    def rows() -> Iterator[tuple[Any, ...]]:
        for _ in range(n):
            at = ctx.now - dt.timedelta(days=ctx.rng.randrange(0, 180), seconds=ctx.rng.randrange(86400))
            actor = "customer" if ctx.rng.random() < 0.8 else "admin"
            yield (actor, ctx.rng.choice(actions), "order", str(ctx.rng.randrange(1, 10**6)), '{"source": "seed"}', at)

    columns = ("actor", "action", "entity", "entity_id", "payload", "created_at")
    return copy_rows(ctx.conn, "audit_logs", columns, rows())


def _sessions(ctx: _Ctx, n: int) -> int:
    def rows() -> Iterator[tuple[Any, ...]]:
        for _ in range(n):
            active = ctx.now - dt.timedelta(days=ctx.rng.randrange(0, 60), seconds=ctx.rng.randrange(86400))
            customer = ctx.customer() if ctx.customers else None
            ua = "Mozilla/5.0 (Linux; Android 14)"
            yield (ctx.rng.randbytes(32).hex(), customer, ua, active - dt.timedelta(hours=2), active)

    columns = ("session_key_hash", "customer_id", "user_agent", "created_at", "last_active_at")
    return copy_rows(ctx.conn, "user_sessions", columns, rows())


def seed(
    conn: Connection,
    counts: SeedCounts,
    today: dt.date,
    rng_seed: int = 7,
    progress: Callable[[str, int], None] | None = None,
    token_sink: Callable[[int, random.Random], int] | None = None,
) -> dict[str, int]:
    """Insert demo rows in the caller's transaction, a table at a time; ids continue after existing rows."""
    tick = progress or (lambda _name, _n: None)
    needs_parents = 1 if (counts.subscriptions or counts.carts) else 0
    ctx = _Ctx(
        conn,
        random.Random(rng_seed),
        today,
        dt.datetime.combine(today, dt.time(12, 0), tzinfo=dt.UTC),
        customers=max(counts.customers, needs_parents),
        products=max(counts.products, needs_parents),
        # Explicit ids so child rows can refer to parents without reading them back.
        first={t: _next_id(conn, t) for t in ("customers", "products", "subscriptions", "carts")},
    )
    out: dict[str, int] = {}
    for name, step, n in (
        ("customers", _customers, ctx.customers),
        ("products", _products, ctx.products),
        ("subscriptions", _subscriptions, counts.subscriptions),
    ):
        out[name] = step(ctx, n)
        tick(name, out[name])
    out["carts"], out["cart_items"] = _carts(ctx, counts.carts)
    tick("carts", out["carts"])
    for name, step, n in (("audit_logs", _audit_logs, counts.audit_logs), ("sessions", _sessions, counts.sessions)):
        out[name] = step(ctx, n)
        tick(name, out[name])
    for table in ("customers", "products", "subscriptions", "carts", "cart_items", "audit_logs", "user_sessions"):
        _fix_sequence(conn, table)
    if counts.tokens and token_sink is not None:
        out["tokens"] = token_sink(counts.tokens, ctx.rng)
        tick("tokens", out["tokens"])
    return out


def is_empty(conn: Connection) -> bool:
    """True when the shop has no customers yet (make up seeds only then)."""
    return conn.execute(text("SELECT NOT EXISTS (SELECT 1 FROM customers)")).scalar_one()
