"""Whether a tensor is sharded by FSDP2 (``fully_shard``), without importing
``torch.distributed`` where the build has none."""
from __future__ import annotations


def is_sharded(t) -> bool:
    """Whether ``t`` is a DTensor (a parameter that FSDP2's ``fully_shard`` split over ranks)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without torch.distributed
        return False
    return isinstance(t, DTensor)
