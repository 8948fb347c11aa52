"""The package version, kept in core so checkpoints can record it without importing the package root."""

__version__ = "0.1.0"
