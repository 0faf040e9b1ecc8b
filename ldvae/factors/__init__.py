"""Factor studies: deviance and order, covariate effects, stability across seeds, rotation,
choice of K, enrichment and the refits they run."""
