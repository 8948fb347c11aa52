"""Low-rank factorization: truncated and activation-aware SVD of Linear layers (``svd.py``)."""
