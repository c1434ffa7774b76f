"""rec: a real-time recommender. This package is pure Python and never imports ray."""

__version__ = "0.1.0"
