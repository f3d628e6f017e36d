"""mreaper: a userspace low-memory killer for Linux built on process_mrelease(2)."""

__version__ = "0.2.0"
