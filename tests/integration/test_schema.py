"""The schema exists only through migrations; it goes up and down cleanly and guards data."""

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import IntegrityError

from devtools.seed import SeedCounts, seed
from lib import db
from lib.config import get_settings
from tests import builders

EXPECTED = {
    "customers",
    "products",
    "subscriptions",
    "orders",
    "order_items",
    "subscription_outcomes",
    "carts",
    "cart_items",
    "audit_logs",
    "user_sessions",
    "notifications",
    "webhook_events",
}


@pytest.fixture
def scratch_db():
    url = get_settings().database_url + "_scratch"
    db.drop_database(url)
    yield url
    db.drop_database(url)


def test_migrate_creates_database_then_down_and_up_again(scratch_db):
    """migrate makes a missing database; downgrade to base empties it; upgrade restores it."""
    db.migrate(scratch_db)
    engine = create_engine(scratch_db)
    try:
        assert set(inspect(engine).get_table_names()) >= EXPECTED
        db.downgrade(scratch_db, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        db.migrate(scratch_db)
        assert set(inspect(engine).get_table_names()) >= EXPECTED
        db.migrate(scratch_db)  # a second run is a no-op
    finally:
        engine.dispose()


def test_stock_cannot_go_negative(pg):
    """The products CHECK refuses negative stock even if a query tries."""
    with pg.begin() as c:
        c.execute(text("INSERT INTO products (sku, name, price_paise, stock) VALUES ('A', 'a', 100, 1)"))
    with pytest.raises(IntegrityError, match="stock_non_negative"), pg.begin() as c:
        c.execute(text("UPDATE products SET stock = stock - 2"))


def test_one_order_per_subscription_and_date(pg):
    """UNIQUE (subscription_id, delivery_date) refuses a second order for the same cycle."""
    with pg.begin() as c:
        seed(
            c,
            SeedCounts(customers=1, products=1, subscriptions=1, carts=0, tokens=0, audit_logs=0, sessions=0),
            builders.today(),
        )
        c.execute(
            text(
                "INSERT INTO orders (customer_id, subscription_id, delivery_date, total_paise) "
                "VALUES (1, 1, current_date, 100)"
            )
        )
    with pytest.raises(IntegrityError, match="uq_orders_subscription_id_delivery_date"), pg.begin() as c:
        c.execute(
            text(
                "INSERT INTO orders (customer_id, subscription_id, delivery_date, total_paise) "
                "VALUES (1, 1, current_date, 100)"
            )
        )


def test_seed_shape(pg):
    """The seed writes the counts asked for, with due, overdue, paused and out-of-stock rows."""
    today = builders.today()
    counts = SeedCounts(
        customers=300, products=60, subscriptions=3000, carts=500, tokens=0, audit_logs=400, sessions=200
    )
    with pg.begin() as c:
        out = seed(c, counts, today)
    assert out["subscriptions"] == 3000 and out["carts"] == 500 and out["customers"] == 300
    with pg.connect() as c:
        q = lambda sql: c.execute(text(sql), {"t": today}).scalar_one()  # noqa: E731
        assert q("SELECT count(*) FROM subscriptions") == 3000
        assert q("SELECT count(*) FROM subscriptions WHERE status='active' AND next_delivery_date = :t") > 100
        assert q("SELECT count(*) FROM subscriptions WHERE status='active' AND next_delivery_date < :t") > 50
        assert q("SELECT count(DISTINCT frequency) FROM subscriptions") == 4
        assert q("SELECT count(*) FROM subscriptions WHERE status <> 'active'") > 200
        assert q("SELECT count(*) FROM products WHERE stock = 0") >= 1
        assert q("SELECT count(*) FROM customers WHERE phone !~ '^\\+91[6-9][0-9]{9}$'") == 0
        assert q("SELECT count(*) FROM carts WHERE updated_at < :t - 30") > 100
        assert q("SELECT count(*) FROM carts WHERE updated_at > :t - 29") > 100
        assert q("SELECT count(*) FROM carts c WHERE NOT EXISTS (SELECT 1 FROM cart_items i WHERE i.cart_id=c.id)") > 50
        assert q("SELECT count(*) FROM audit_logs") == 400
        # sequences continue after seeded ids, so the backend can insert afterwards
        c.execute(text("INSERT INTO customers (name, email) VALUES ('x', 'x@example.in')"))


def test_migrations_match_the_models(pg):
    """The migrated schema has exactly what lib/models.py declares (no drift either way)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from lib.models import Base

    with pg.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_ping_warms_the_pool_or_names_the_unreachable_database(pg, monkeypatch):
    """db.ping() leaves a pooled connection open on the test database; against a closed port it raises
    ServiceUnavailableError naming DATABASE_URL's address and how to start PostgreSQL."""
    from devtools.smtp_sink import free_port
    from lib.errors import ServiceUnavailableError

    db.ping()
    assert db.get_engine().pool.checkedin() >= 1
    monkeypatch.setenv("DATABASE_URL", f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/nowhere")
    get_settings.cache_clear()
    db.reset_engine()
    try:
        with pytest.raises(ServiceUnavailableError, match=r"PostgreSQL is not reachable at .*127\.0\.0\.1:\d+"):
            db.ping()
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
        db.reset_engine()
