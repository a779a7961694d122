"""Storage: SQLAlchemy 2 (async) models, the engine (SQLite or PostgreSQL), migrations, sealing."""
