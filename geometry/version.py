"""The package's one version, read by the build (``pyproject.toml``: ``version = {attr = ...}``), by
``geometry.__version__`` and by ``python -m geometry --version``."""

__version__ = "0.3.0"
