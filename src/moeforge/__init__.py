"""moeforge: raw text to a trained, evaluated and served Mixture-of-Experts language model."""

__version__ = "0.1.0"
__all__ = ["__version__"]
