"""PNG figures of the results report (matplotlib's Agg canvas; no pyplot global state).

- MRE per true count (paper Fig. 14), from the evaluation entries of results.json;
- training curves, from each run's metrics.csv;
- natural <-> synthetic translations and reconstructions (paper Figs. 5-8), from a checkpoint;
- a 2-D embedding (UMAP, paper Fig. 13; or PCA) of the latent means, coloured by count and domain.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from twinvae.data.imageset import ImageSet
from twinvae.errors import ConfigError

Embedding = Literal["umap", "pca"]


def new_figure(width: float, height: float, dpi: int = 110) -> Any:
    """A matplotlib figure on its own Agg canvas (no pyplot global state), size in inches."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Any, path: Path) -> Path:
    """Write the figure as PNG to path (its folder made if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def plot_mre_per_count(
    curves: Sequence[tuple[str, dict[str, dict[str, float]]]], title: str, path: Path
) -> Path:
    """One line per (label, per_count) with MRE in percent over the true count."""
    figure = new_figure(7.0, 4.0)
    axes = figure.add_subplot(1, 1, 1)
    for label, per_count in curves:
        counts = sorted(int(c) for c in per_count)
        mre = [100.0 * per_count[str(c)]["mre"] for c in counts]
        axes.plot(counts, mre, marker="o", markersize=3, label=label)
    axes.set_xlabel("true cell count")
    axes.set_ylabel("MRE (%)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if curves:
        axes.legend(fontsize=7)
    return save_figure(figure, path)


def read_metrics(paths: Sequence[Path]) -> list[dict[str, str]]:
    """The rows of one or more metrics.csv files (legs of a double transfer in order)."""
    rows: list[dict[str, str]] = []
    for path in paths:
        if path.is_file():
            with path.open(newline="", encoding="utf-8") as stream:
                rows.extend(csv.DictReader(stream))
    return rows


def _column(rows: Sequence[dict[str, str]], key: str) -> np.ndarray:
    return np.array([float(r[key]) if r.get(key) not in (None, "") else np.nan for r in rows])


def plot_training_curves(metrics_files: Sequence[Path], title: str, path: Path) -> Path | None:
    """Loss and validation MAE / accuracy per epoch; None when there are no metrics."""
    rows = read_metrics(metrics_files)
    if not rows:
        return None
    epochs = np.arange(1, len(rows) + 1)
    figure = new_figure(9.0, 3.2)
    loss_axes, val_axes = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    loss_axes.plot(epochs, _column(rows, "loss"), marker=".", label="total loss")
    for key in ("natural_reg", "synthetic_reg"):
        values = _column(rows, key)
        if np.isfinite(values).any():
            loss_axes.plot(epochs, values, marker=".", label=key, alpha=0.8)
    loss_axes.set_yscale("log")
    loss_axes.set_xlabel("epoch (all legs)")
    loss_axes.set_title("training loss")
    loss_axes.legend(fontsize=7)
    val_axes.plot(epochs, _column(rows, "val_mae"), marker=".", label="validation MAE")
    if "synthetic_val_mae" in rows[0]:
        values = _column(rows, "synthetic_val_mae")
        if np.isfinite(values).any():
            val_axes.plot(epochs, values, marker=".", alpha=0.7, label="synthetic val. MAE")
    accuracy_axes = val_axes.twinx()
    accuracy_axes.plot(
        epochs, 100 * _column(rows, "val_accuracy"), marker=".", color="tab:green", alpha=0.6
    )
    accuracy_axes.set_ylabel("validation accuracy (%)", color="tab:green")
    val_axes.set_xlabel("epoch (all legs)")
    val_axes.set_title("validation (chamber split of train)")
    val_axes.legend(fontsize=7, loc="upper right")
    boundary = 0
    for metrics_file in metrics_files[:-1]:
        boundary += len(read_metrics([metrics_file]))
        for axes in (loss_axes, val_axes):
            axes.axvline(boundary + 0.5, color="grey", linestyle="--", linewidth=0.8)
    figure.suptitle(title)
    return save_figure(figure, path)


def _pick_spread(image_set: ImageSet, count: int) -> np.ndarray:
    """Indices of `count` labelled images spread evenly over the sorted true counts."""
    labelled = np.flatnonzero(image_set.counts > 0)
    order = labelled[np.argsort(image_set.counts[labelled], kind="stable")]
    if len(order) <= count:
        return order
    return order[np.linspace(0, len(order) - 1, count).round().astype(int)]


def _to_tensor(images: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).float().div(255.0).unsqueeze(1)


def plot_translations(
    checkpoint: Path,
    natural: ImageSet,
    synthetic: ImageSet | None,
    title: str,
    path: Path,
    count: int = 6,
) -> Path:
    """Rows of input, reconstruction and cross-domain translation (paper Figs. 5-8).

    Natural images are translated to the synthetic look and synthetic ones to the natural look;
    a model trained without the synthetic twin (synthetic=None) shows reconstructions only.
    """
    import torch

    from twinvae.training.checkpoint import load_model

    model, _ = load_model(checkpoint)
    panels: list[tuple[str, np.ndarray, list[str]]] = []
    sources: list[tuple[str, str, ImageSet]] = [("natural", "synthetic", natural)]
    if synthetic is not None:
        sources.append(("synthetic", "natural", synthetic))
    with torch.no_grad():
        for domain, other, image_set in sources:
            index = _pick_spread(image_set, count)
            mu = model.encode(_to_tensor(image_set.images[index]), domain)[0]  # type: ignore[arg-type]
            predicted = model.regress(mu).numpy()
            captions = [
                f"{int(true)} / {value:.1f}"
                for true, value in zip(image_set.counts[index], predicted, strict=True)
            ]
            panels.append((f"{domain} input", image_set.images[index], captions))
            recon = _as_uint8(model.decode(mu, domain))  # type: ignore[arg-type]
            panels.append((f"{domain} reconstruction", recon, []))
            if synthetic is not None:
                translated = _as_uint8(model.decode(mu, other))  # type: ignore[arg-type]
                panels.append((f"{domain} -> {other}", translated, []))
    columns = max(len(images) for _, images, _ in panels)
    figure = new_figure(1.6 * columns + 1.5, 1.7 * len(panels))
    for row, (label, images, captions) in enumerate(panels):
        for column, image in enumerate(images):
            axes = figure.add_subplot(len(panels), columns, row * columns + column + 1)
            axes.imshow(image, cmap="gray", vmin=0, vmax=255)
            axes.set_xticks([])
            axes.set_yticks([])
            if captions:
                axes.set_title(captions[column], fontsize=7)
            if column == 0:
                axes.set_ylabel(label, fontsize=7)
    figure.suptitle(f"{title}\n(titles: true count / predicted count)", fontsize=9)
    return save_figure(figure, path)


def _as_uint8(tensor: Any) -> np.ndarray:
    array = tensor.squeeze(1).clamp(0, 1).mul(255).round().byte().numpy()
    return np.asarray(array)


def latent_means(
    checkpoint: Path, sets: Sequence[tuple[str, ImageSet]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mu of every image (each domain through its own encoder), counts, and domain index."""
    import torch

    from twinvae.training.checkpoint import load_model

    model, _ = load_model(checkpoint)
    codes, counts, domains = [], [], []
    with torch.no_grad():
        for domain_index, (domain, image_set) in enumerate(sets):
            for start in range(0, len(image_set), 128):
                batch = _to_tensor(image_set.images[start : start + 128])
                codes.append(model.encode(batch, domain)[0].numpy())  # type: ignore[arg-type]
            counts.append(image_set.counts.astype(int))
            domains.append(np.full(len(image_set), domain_index))
    return np.concatenate(codes), np.concatenate(counts), np.concatenate(domains)


def embed(codes: np.ndarray, method: Embedding, seed: int = 0) -> np.ndarray:
    """2-D embedding of latent codes by UMAP (umap-learn) or PCA."""
    if method == "pca":
        centred = codes - codes.mean(axis=0)
        _, _, components = np.linalg.svd(centred, full_matrices=False)
        projected = centred @ components[:2].T
        if projected.shape[1] < 2:
            projected = np.pad(projected, ((0, 0), (0, 2 - projected.shape[1])))
        return np.asarray(projected)
    if method != "umap":
        raise ConfigError(f"embedding {method!r}: expected umap or pca")
    try:
        import umap
    except ImportError:
        raise ConfigError(
            "the latent-space figure uses UMAP, which needs umap-learn: "
            "pip install 'twinvae[report]' (or umap-learn), or choose --embedding pca"
        ) from None
    reducer = umap.UMAP(n_neighbors=min(15, len(codes) - 1), random_state=seed, n_jobs=1)
    return np.asarray(reducer.fit_transform(codes))


def plot_latent(
    points: np.ndarray,
    counts: np.ndarray,
    domains: np.ndarray,
    domain_names: Sequence[str],
    title: str,
    path: Path,
) -> Path:
    """Two scatter plots of the same embedding: coloured by cell count and by domain."""
    figure = new_figure(10.0, 4.2)
    by_count, by_domain = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    scatter = by_count.scatter(points[:, 0], points[:, 1], c=counts, cmap="viridis", s=6)
    figure.colorbar(scatter, ax=by_count, label="cell count")
    by_count.set_title("coloured by count")
    for index, name in enumerate(domain_names):
        chosen = domains == index
        by_domain.scatter(points[chosen, 0], points[chosen, 1], s=6, alpha=0.6, label=name)
    by_domain.legend(fontsize=7)
    by_domain.set_title("coloured by domain")
    for axes in (by_count, by_domain):
        axes.set_xticks([])
        axes.set_yticks([])
    figure.suptitle(title)
    return save_figure(figure, path)
