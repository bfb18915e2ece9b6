"""The package version, on the floor: the metrics read it as well as the package's face."""

__version__ = "0.2.0"  # the package version too (pyproject.toml reads it)
