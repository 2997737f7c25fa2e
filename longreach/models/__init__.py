"""load(): aliases, local directories, offline caches."""

from longreach.models.loader import load

__all__ = ["load"]
