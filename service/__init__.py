"""Keel's serving side: the HTTP service, the batch job and the inference core they share."""

__version__ = "0.1.0"  # Keel's version: pyproject.toml, every command's --version and GET /v2 read it here
