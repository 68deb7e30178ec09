"""The package version (here, so that modules below the package facade can record it)."""

__version__ = "0.1.0"
