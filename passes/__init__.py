"""Graph passes: one pass per file, each returning a PassResult."""
