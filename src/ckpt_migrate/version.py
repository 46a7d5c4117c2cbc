"""The package's version, read once from its installed metadata (``pyproject.toml``)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ckpt-migrate")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"
