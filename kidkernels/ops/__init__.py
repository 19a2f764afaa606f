"""Dispatch layer: shapes, dtypes, chunking, backend choice, and the ops registered with ``torch.library``
(:mod:`.custom_ops`) that the public API calls."""
