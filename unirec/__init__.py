"""unirec: one multi-task ranking model for many recommendation use cases."""

__version__ = "0.1.0"
