"""DCN-v2 variant (re-exported from :mod:`models.dlrm`, where it shares DLRM's sparse and dense arches)."""

from models.dlrm import DCN

__all__ = ["DCN"]
