"""Batch generation on Ray Data: manifest rows -> GPU actor pool -> images and per-row metrics (issue 3)."""
