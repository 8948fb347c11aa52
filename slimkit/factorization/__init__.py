"""Low-rank factorization: truncated and activation-aware SVD of Linear layers (``svd.py``), Tucker-2 and CP
of Conv2d (``conv.py``), the rank rules they share (``common.py``) and rank allocation under a parameter
budget by measured sensitivity (``allocation.py``)."""
