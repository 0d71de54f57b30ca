"""gunicorn entry point: ``gunicorn app:app``."""

from ccci.web import create_app

app = create_app()
