"""The one place the version lives (pyproject.toml reads it; ``guard.__version__`` re-exports it)."""

__version__ = "0.2.0"
