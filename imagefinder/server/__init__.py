"""The HTTP server: ``app.create_app`` builds it; routes in ``search``, ``browse``,
``writes``; shared pieces in ``deps`` and ``schemas``; the page in ``static/``."""
