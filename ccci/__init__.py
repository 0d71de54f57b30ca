"""ccci: comment-triggered CI for Co-op Cloud recipes."""

__version__ = "0.1.0"
