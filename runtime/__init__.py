"""kiln.runtime: load a compiled artifact and generate text with it."""
