"""Layer-free helpers: atomic file writing and background prefetching."""
