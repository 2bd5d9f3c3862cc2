"""The MIL head (:mod:`.model`) and in-memory bags of cached features (:mod:`.bags`)."""

from wsi_mil.mil.model import MILOutput, PositionalAttentionMIL

__all__ = ["MILOutput", "PositionalAttentionMIL"]
