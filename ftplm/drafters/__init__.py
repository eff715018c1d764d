"""Speculative drafters, one file each, registered by name (used by ftplm.generate)."""
