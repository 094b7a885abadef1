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


def seed(
    conn: Connection,
    counts: SeedCounts,
    today: dt.date,
    rng_seed: int = 7,
    progress: Callable[[str, int], None] | None = None,
    token_sink: Callable[[int, random.Random], int] | None = None,
) -> dict[str, int]:
    """Insert demo rows in the caller's transaction; ids continue after existing rows."""
    rng = random.Random(rng_seed)
    now = dt.datetime.combine(today, dt.time(12, 0), tzinfo=dt.UTC)
    tick = progress or (lambda _name, _n: None)
    out: dict[str, int] = {}
    # Explicit ids so child rows can refer to parents without reading them back.
    c0, p0, s0, k0 = (_next_id(conn, t) for t in ("customers", "products", "subscriptions", "carts"))
    ncust = max(counts.customers, 1 if (counts.subscriptions or counts.carts) else 0)
    nprod = max(counts.products, 1 if (counts.subscriptions or counts.carts) else 0)

    def customers() -> Iterator[tuple]:
        for i in range(ncust):
            cid = c0 + i
            first, last = rng.choice(FIRST), rng.choice(LAST)
            phone = f"+91{rng.choice('6789')}{rng.randrange(10**8, 10**9)}"
            seen = now - dt.timedelta(days=rng.randrange(0, 120))
            yield (
                cid,
                f"{first} {last}",
                f"{first}.{last}.{cid}@example.in".lower(),
                phone,
                rng.random() > 0.05,
                rng.random() > 0.15,
                seen,
            )

    out["customers"] = copy_rows(
        conn, "customers", ("id", "name", "email", "phone", "email_opt_in", "sms_opt_in", "last_seen_at"), customers()
    )
    tick("customers", out["customers"])

    def products() -> Iterator[tuple]:
        for i in range(nprod):
            pid = p0 + i
            base = PRODUCTS[i % len(PRODUCTS)]
            size = ("100 g", "250 g", "500 ml", "60 caps", "1 kg")[i // len(PRODUCTS) % 5]
            stock = 0 if rng.random() < 0.05 else rng.randrange(20, 5000)
            yield (pid, f"IS-{pid:06d}", f"{base} {size}", rng.randrange(99, 2499) * 100, stock)

    out["products"] = copy_rows(conn, "products", ("id", "sku", "name", "price_paise", "stock"), products())
    tick("products", out["products"])

    freqs, weights = zip(*FREQUENCY_WEIGHTS.items(), strict=True)

    def subscriptions() -> Iterator[tuple]:
        for i in range(counts.subscriptions):
            roll = rng.random()
            if roll < 0.10:
                nxt = today
            elif roll < 0.15:
                nxt = today - dt.timedelta(days=rng.randrange(1, 4))
            else:
                nxt = today + dt.timedelta(days=rng.randrange(1, 90))
            status = "active" if rng.random() < 0.85 else rng.choice(("paused", "cancelled"))
            anchor = 31 if nxt.day == _days_in_month(nxt) and rng.random() < 0.5 else nxt.day
            yield (
                s0 + i,
                c0 + rng.randrange(ncust),
                p0 + rng.randrange(nprod),
                rng.choice((1, 1, 1, 2, 3)),
                rng.choices(freqs, weights)[0],
                status,
                nxt,
                anchor,
            )

    out["subscriptions"] = copy_rows(
        conn,
        "subscriptions",
        ("id", "customer_id", "product_id", "quantity", "frequency", "status", "next_delivery_date", "anchor_day"),
        subscriptions(),
    )
    tick("subscriptions", out["subscriptions"])

    cart_items: list[tuple] = []

    def carts() -> Iterator[tuple]:
        for i in range(counts.carts):
            kid = k0 + i
            age = rng.randrange(0, 120)
            updated = now - dt.timedelta(days=age, minutes=rng.randrange(0, 1440))
            if rng.random() > 0.3:
                for _ in range(rng.randrange(1, 4)):
                    cart_items.append((kid, p0 + rng.randrange(nprod), rng.randrange(1, 4), updated))
            customer = c0 + rng.randrange(ncust) if rng.random() < 0.6 else None
            yield (kid, customer, updated - dt.timedelta(hours=rng.randrange(0, 48)), updated)

    out["carts"] = copy_rows(conn, "carts", ("id", "customer_id", "created_at", "updated_at"), carts())
    out["cart_items"] = copy_rows(conn, "cart_items", ("cart_id", "product_id", "quantity", "added_at"), cart_items)
    tick("carts", out["carts"])

    actions = ("login", "update_address", "place_order", "cancel_subscription", "refund", "change_price")

    def audit_logs() -> Iterator[tuple]:
        for _ in range(counts.audit_logs):
            at = now - dt.timedelta(days=rng.randrange(0, 180), seconds=rng.randrange(86400))
            yield (
                "customer" if rng.random() < 0.8 else "admin",
                rng.choice(actions),
                "order",
                str(rng.randrange(1, 10**6)),
                '{"source": "seed"}',
                at,
            )

    out["audit_logs"] = copy_rows(
        conn, "audit_logs", ("actor", "action", "entity", "entity_id", "payload", "created_at"), audit_logs()
    )
    tick("audit_logs", out["audit_logs"])

    def sessions() -> Iterator[tuple]:
        for _ in range(counts.sessions):
            active = now - dt.timedelta(days=rng.randrange(0, 60), seconds=rng.randrange(86400))
            yield (
                rng.randbytes(32).hex(),
                c0 + rng.randrange(ncust) if ncust else None,
                "Mozilla/5.0 (Linux; Android 14)",
                active - dt.timedelta(hours=2),
                active,
            )

    out["sessions"] = copy_rows(
        conn,
        "user_sessions",
        ("session_key_hash", "customer_id", "user_agent", "created_at", "last_active_at"),
        sessions(),
    )
    tick("sessions", out["sessions"])

    for table in ("customers", "products", "subscriptions", "carts", "cart_items", "audit_logs", "user_sessions"):
        _fix_sequence(conn, table)

    if counts.tokens and token_sink is not None:
        out["tokens"] = token_sink(counts.tokens, rng)
        tick("tokens", out["tokens"])
    return out


def is_empty(conn: Connection) -> bool:
    """True when the shop has no customers yet (make up seeds only then)."""
    return conn.execute(text("SELECT NOT EXISTS (SELECT 1 FROM customers)")).scalar_one()
