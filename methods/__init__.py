"""Attribution methods of seq-instrument, one module per family, found through a registry."""
