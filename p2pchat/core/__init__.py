"""The protocol core: pure code, no I/O, no trio."""
