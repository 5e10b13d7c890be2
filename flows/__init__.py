"""Prefect flows: thin wrappers over library functions, one task per coarse unit of work."""
