"""The Administration Console (FastAPI + Jinja2) and the REST API (``/api/v1``), served over HTTPS."""
