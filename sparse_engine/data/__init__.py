"""Real data sets, loaded from local files only (nothing is downloaded at run time)."""
from sparse_engine.data.fashion_mnist import DEFAULT_DIRS, load_fashion_mnist

__all__ = ["load_fashion_mnist", "DEFAULT_DIRS"]
