"""deepscope: see inside trained image classifiers."""

__version__ = "0.1.0"

__all__ = ["__version__"]
