"""Evaluation protocols (paper-split, chamber-cv, anchored), chamber folds and image-free rules."""
