"""Summaries of protocol results: mean and standard deviation over folds, every fold's numbers,
and the metrics of all held-out images pooled.

Input: the ``result.json`` files `twinvae.protocols.runner` writes (one per protocol, method,
modality and fold). `summarize` groups them by (protocol, modality, method).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from twinvae.errors import ConfigError
from twinvae.evaluation.metrics import growth_summary, paper_metrics
from twinvae.protocols.runner import PROTOCOLS, RESULT_FILE, RESULT_FORMAT, read_json

SUMMARY_FORMAT = "twinvae-protocol-summary/1"
SUMMARY_KEYS = (
    "mae",
    "mre",
    "accuracy",
    "within_one",
    "mae_unrounded",
    "mre_unrounded",
    "bias",
    "slope",
    "intercept",
    "negative",
)
GROWTH_KEYS = ("median_relative_error", "worst_relative_error")


@dataclass
class Result:
    """One result.json and the folder it is in."""

    data: dict[str, Any]
    folder: Path

    @property
    def key(self) -> tuple[int, str, str]:
        protocol = str(self.data["protocol"])
        order = list(PROTOCOLS).index(protocol) if protocol in PROTOCOLS else len(PROTOCOLS)
        return order, str(self.data["modality"]), str(self.data["method"])

    def predictions(self) -> list[dict[str, Any]]:
        report = read_json(self.folder / str(self.data.get("eval_json", "eval.json")))
        if report is None or not isinstance(report.get("predictions"), list):
            raise ConfigError(f"{self.folder}: its eval.json is missing or unreadable")
        return list(report["predictions"])


def collect(out: Path) -> list[Result]:
    """Every protocol result.json under ``out``."""
    if not out.is_dir():
        raise ConfigError(f"{out}: results folder not found")
    results = []
    for path in sorted(out.rglob(RESULT_FILE)):
        data = read_json(path)
        if data is not None and data.get("format") == RESULT_FORMAT:
            results.append(Result(data, path.parent))
    if not results:
        raise ConfigError(
            f"{out}: holds no protocol result ({RESULT_FILE}); run `twinvae protocol "
            f"paper-split|chamber-cv|anchored ... --out {out}` first"
        )
    return results


def _spread(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1; None for one value) of the known values."""
    known = [float(v) for v in values if v is not None]
    if not known:
        return None, None
    mean = float(np.mean(known))
    return mean, float(np.std(known, ddof=1)) if len(known) > 1 else None


def _pooled(results: list[Result]) -> dict[str, Any]:
    rows = [row for result in results for row in result.predictions()]
    predicted = np.array([row["predicted"] for row in rows], dtype=np.float64)
    truth = np.array([row["count"] for row in rows], dtype=np.float64)
    chambers: dict[str, dict[str, Any]] = {}
    for result in results:
        growth = result.data.get("growth") or {}
        chambers.update(growth.get("per_chamber") or {})
    return {"overall": paper_metrics(predicted, truth), "growth": growth_summary(chambers)}


def summarize(results: list[Result]) -> list[dict[str, Any]]:
    """One entry per (protocol, modality, method): per-fold numbers, mean ± sd, pooled."""
    groups: dict[tuple[int, str, str], list[Result]] = {}
    for result in results:
        groups.setdefault(result.key, []).append(result)
    entries = []
    for key in sorted(groups):
        members = sorted(
            groups[key], key=lambda r: -1 if r.data["fold"] is None else r.data["fold"]
        )
        first = members[0].data
        expected = first.get("folds")
        per_fold = [
            {
                "fold": r.data["fold"],
                **{k: r.data["overall"].get(k) for k in ("n", *SUMMARY_KEYS)},
                "growth": {
                    k: (r.data.get("growth") or {}).get("summary", {}).get(k) for k in GROWTH_KEYS
                },
                "result": str(r.folder / RESULT_FILE),
            }
            for r in members
        ]
        mean: dict[str, float | None] = {}
        std: dict[str, float | None] = {}
        for metric in SUMMARY_KEYS:
            mean[metric], std[metric] = _spread([f[metric] for f in per_fold])
        for metric in GROWTH_KEYS:
            mean[f"growth_{metric}"], std[f"growth_{metric}"] = _spread(
                [f["growth"][metric] for f in per_fold]
            )
        folds_done = [r.data["fold"] for r in members if r.data["fold"] is not None]
        entries.append(
            {
                "protocol": first["protocol"],
                "modality": first["modality"],
                "method": first["method"],
                "method_kind": first.get("method_kind"),
                "folds": expected,
                "folds_done": folds_done,
                "complete": expected is None or sorted(folds_done) == list(range(expected)),
                "per_fold": per_fold,
                "mean": mean,
                "std": std,
                "std_definition": "sample standard deviation over folds (ddof 1)",
                "pooled": _pooled(members),
            }
        )
    return entries


def summary_payload(out: Path) -> dict[str, Any]:
    """The JSON `twinvae protocol summary --json` writes."""
    return {"format": SUMMARY_FORMAT, "results": str(out), "entries": summarize(collect(out))}
