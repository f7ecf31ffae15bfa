"""Reproducing the papers: experiment plans and their runner, baselines, and the results report.

`plan` (validated YAML plans), `runner` (train/transfer -> export -> evaluate the bundle),
`baselines` (the watershed counter), `report` and `figures` (RESULTS.md, results.json, PNGs),
`reference` (the paper's Table 2 and the reproduction goals).
"""
