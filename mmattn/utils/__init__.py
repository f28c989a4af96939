"""Utilities: the dependency stack check and environment report."""
