"""Evaluation: MAE, MRE and exact-count accuracy, overall and per true count."""
