"""MM-IMDb evaluation task."""
