"""Reducible statistics and where they are written."""
