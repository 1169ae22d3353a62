"""nswatch: a live, exact model of every Linux network namespace."""

__version__ = "0.1.0"
