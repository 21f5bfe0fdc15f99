"""ImageFinder: image similarity search over a SQLite + sqlite-vec index."""

__version__ = "0.1.0"
