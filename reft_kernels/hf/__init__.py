"""Hugging Face integration (in progress; see the README's status). Today: the positions helper
(``positions.py``) that turns attention masks and prompt lengths into pyreft-style intervention
locations and flat row indices, with no transformers dependency."""
from .positions import intervention_locations, locations_to_rows, parse_positions

__all__ = ["intervention_locations", "locations_to_rows", "parse_positions"]
