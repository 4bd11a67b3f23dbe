"""Data: quality filters, near-duplicate index, metrics, examples and their file formats, splits, dataset cards.

May import: store."""
