"""Alembic migration scripts of the broker's database (run by ``Store.open(migrate=True)``)."""
