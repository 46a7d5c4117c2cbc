"""The package's version, read from its installed metadata (``pyproject.toml``) when first asked
for: importlib.metadata costs ~25 ms, which a login-node command need not pay."""

import functools


@functools.lru_cache(maxsize=None)
def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ckpt-migrate")
    except PackageNotFoundError:  # a source tree that is not installed
        return "0+unknown"
