"""data.label_budget / data.label_chambers: N labelled frames from a few chambers, seeded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from _fine_tune_data import write_labelled_folder
from twinvae.config import DataConfig, config_from_dict
from twinvae.data.budget import apply_label_budget
from twinvae.data.imageset import ImageSet
from twinvae.data.splits import parse_chamber
from twinvae.errors import ConfigError, DataError, TwinVAEWarning


def _frames(chambers: int = 3, frames: int = 30) -> ImageSet:
    """chambers x frames images; every third frame labelled (10 labels per chamber)."""
    names = [f"expxy{c:02d}t{f:03d}c1.png" for c in range(1, chambers + 1) for f in range(frames)]
    counts = [(f % 5) + 1 if f % 3 == 0 else 0 for _ in range(chambers) for f in range(frames)]
    images = np.zeros((len(names), 8, 8), dtype=np.uint8)
    return ImageSet(images=images, counts=np.array(counts), names=names, source="frames")


def _labelled_chambers(image_set: ImageSet) -> dict[str, int]:
    found: dict[str, int] = {}
    for name in np.asarray(image_set.names)[image_set.labelled]:
        found[parse_chamber(str(name))] = found.get(parse_chamber(str(name)), 0) + 1
    return found


def test_budget_keeps_n_labels_from_the_chosen_chambers() -> None:
    frames = _frames()
    result = apply_label_budget(frames, 10, 2, seed=3)
    kept = result.images
    assert int(kept.labelled.sum()) == 10 and result.dropped == 20
    assert sorted(_labelled_chambers(kept).values()) == [5, 5]
    assert len(kept) == len(frames) and kept.names == frames.names
    assert np.all(kept.counts[kept.labelled] == frames.counts[kept.labelled])  # labels unchanged
    assert "kept 10 labelled images from exp/xy" in result.describe()
    again = apply_label_budget(frames, 10, 2, seed=3).images
    assert np.array_equal(again.counts, kept.counts)  # seeded
    draws = {tuple(apply_label_budget(frames, 10, 2, seed=s).images.counts) for s in range(6)}
    assert len(draws) > 1  # the seed matters


def test_budget_from_named_chambers_shares_out_what_they_hold() -> None:
    frames = _frames()
    result = apply_label_budget(frames, 14, ["exp/xy03", "exp/xy01"], seed=0)
    assert _labelled_chambers(result.images) == {"exp/xy03": 7, "exp/xy01": 7}
    uneven = apply_label_budget(frames, 18, ["exp/xy01", "exp/xy02"], seed=0)
    assert _labelled_chambers(uneven.images) == {"exp/xy01": 9, "exp/xy02": 9}
    plain = apply_label_budget(frames, 4, None, seed=0)
    assert int(plain.images.labelled.sum()) == 4 and "all chambers" in plain.describe()


@pytest.mark.parametrize(
    ("budget", "chambers", "message"),
    [
        (25, ["exp/xy01", "exp/xy02"], "hold only 20 labelled images"),
        (10, ["exp/xy09"], r"exp/xy09, which hold no labelled image; chambers with labels"),
        (30, 2, "needs 2 chambers with at least 15 labelled images each"),
        (31, None, "only 30 images are labelled"),
    ],
)
def test_budget_says_what_the_data_lacks(
    budget: int, chambers: int | list[str] | None, message: str
) -> None:
    with pytest.raises(DataError, match=message):
        apply_label_budget(_frames(), budget, chambers, seed=0)


def test_label_chambers_needs_a_budget() -> None:
    with pytest.raises(ConfigError, match="label_chambers needs label_budget"):
        config_from_dict({"data": {"label_chambers": 2}})
    parsed = config_from_dict({"data": {"label_budget": 10, "label_chambers": ["a/xy01"]}})
    assert parsed.data.label_chambers == ["a/xy01"]


def test_training_data_holds_only_the_budget(tmp_path: Path) -> None:
    from twinvae.training.data import prepare_data

    folder = write_labelled_folder(tmp_path / "images", labelled=40)
    data = DataConfig(
        natural=str(folder), label_budget=6, label_chambers=2, split_by="file", natural_only=True
    )
    with pytest.warns(TwinVAEWarning, match="label budget: kept 6 labelled images from"):
        prepared = prepare_data(data, seed=0)
    train, val = prepared.natural_train, prepared.natural_val
    assert int(train.labelled.sum()) + int(val.labelled.sum()) == 6
    assert len(train) + len(val) == 40  # the other frames stay, unlabelled
    chambers = {**_labelled_chambers(train), **_labelled_chambers(val)}
    assert len(chambers) == 2
