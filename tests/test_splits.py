"""Tests of chamber parsing, the chamber-wise validation split and the Table 1 set names."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import FolderMaker, chamber_rows
from twinvae.data.imageset import ImageSet
from twinvae.data.setnames import (
    SET_NAMES,
    TEST_SEED_OFFSET,
    format_set_name,
    parse_set_name,
    resolve_set_name,
)
from twinvae.data.splits import (
    choose_group_by,
    group_ids,
    parse_chamber,
    parse_frame,
    split_by_chamber,
)
from twinvae.errors import ConfigError, DataError, TwinVAEWarning

# --- chamber names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "chamber", "frame"),
    [
        ("nd063_cropxy01t005c1.png", "nd063_crop/xy01", 5),
        ("train/nd063_cropxy13t217c1.png", "nd063_crop/xy13", 217),
        ("train_set2/testxy2t001c1.jpg", "test/xy2", 1),
        ("test_set4/nd015_cropKond__bottom_9t002c1.jpg", "nd015_cropKond__bottom_9", 2),
        ("nd004xy04t300c1.tif", "nd004/xy04", 300),
    ],
)
def test_parse_chamber_and_frame(name: str, chamber: str, frame: int) -> None:
    assert parse_chamber(name) == chamber
    assert parse_frame(name) == frame


def test_same_position_in_other_experiment_is_another_chamber() -> None:
    assert parse_chamber("nd037_cropxy01t001c1.png") != parse_chamber("nd063_cropxy01t001c1.png")


def test_names_without_the_pattern() -> None:
    with pytest.raises(DataError, match=r"cell_007\.png: cannot tell its chamber"):
        parse_chamber("cell_007.png")
    with pytest.raises(DataError) as error:
        group_ids(["a.png", "b.png"])
    assert "--set data.split_by=file" in str(error.value)  # the config key that exists
    assert "group_by" not in str(error.value)
    assert group_ids(["a.png", "b.png"], group_by="file") == ["a.png", "b.png"]
    with pytest.raises(ConfigError, match="group_by"):
        group_ids(["a.png"], group_by="frame")  # type: ignore[arg-type]


# --- chamber split ---------------------------------------------------------------------------


def _image_set(rows: list[tuple[str, int]]) -> ImageSet:
    return ImageSet(
        images=np.zeros((len(rows), 4, 4), np.uint8),
        counts=np.array([count for _, count in rows]),
        names=[name for name, _ in rows],
        source="memory",
    )


def test_split_is_deterministic_and_keeps_chambers_whole() -> None:
    image_set = _image_set(chamber_rows(chambers=12, frames=9))
    train, val = split_by_chamber(image_set, val_fraction=0.25, seed=3)
    again_train, again_val = split_by_chamber(image_set, val_fraction=0.25, seed=3)
    assert val.names == again_val.names and train.names == again_train.names
    assert len(train) + len(val) == len(image_set)
    assert set(train.names).isdisjoint(val.names)
    train_chambers = set(group_ids(train.names))
    val_chambers = set(group_ids(val.names))
    assert train_chambers.isdisjoint(val_chambers)
    assert len(train_chambers | val_chambers) == 12


def test_split_aims_for_the_labelled_fraction() -> None:
    image_set = _image_set(chamber_rows(chambers=20, frames=12))
    total_labelled = int(image_set.labelled.sum())
    for seed in range(5):
        train, val = split_by_chamber(image_set, val_fraction=0.2, seed=seed)
        share = val.labelled.sum() / total_labelled
        assert abs(share - 0.2) <= 0.05, (seed, share)
        assert train.labelled.any() and val.labelled.any()


def test_different_seeds_give_different_splits() -> None:
    image_set = _image_set(chamber_rows(chambers=20, frames=6))
    validation_sets = {
        tuple(sorted(set(group_ids(split_by_chamber(image_set, 0.2, seed=seed)[1].names))))
        for seed in range(6)
    }
    assert len(validation_sets) >= 4


def test_labels_scarce_in_some_chambers() -> None:
    rows = chamber_rows(chambers=6, frames=10, labelled_every=100)  # no labels at all ...
    rows[0] = (rows[0][0], 5)  # ... except one image in chamber 1
    rows[-1] = (rows[-1][0], 2)  # ... and one in chamber 6
    train, val = split_by_chamber(_image_set(rows), val_fraction=0.2, seed=0)
    assert int(train.labelled.sum()) == 1 and int(val.labelled.sum()) == 1


def test_unlabelled_set_is_split_by_image_share() -> None:
    rows = chamber_rows(chambers=10, frames=5, labelled_every=100)
    train, val = split_by_chamber(_image_set(rows), val_fraction=0.3, seed=1)
    assert len(val) == 15 and len(train) == 35


def test_split_errors() -> None:
    one_chamber = _image_set(chamber_rows(chambers=1, frames=6))
    with pytest.raises(DataError, match="at least 2"):
        split_by_chamber(one_chamber)
    rows = chamber_rows(chambers=3, frames=6)
    labels_in_one = [(name, count if "xy01" in name else 0) for name, count in rows]
    with pytest.raises(DataError, match="all labelled images come from one chamber"):
        split_by_chamber(_image_set(labels_in_one))
    with pytest.raises(ConfigError, match="val_fraction"):
        split_by_chamber(_image_set(rows), val_fraction=1.0)
    with pytest.raises(DataError, match="cannot tell its chamber"):
        split_by_chamber(_image_set([("a.png", 1), ("b.png", 2)]))


def _generic_folder(make_image_folder: FolderMaker, names: list[str]) -> Path:
    return make_image_folder(names, {name: index % 5 for index, name in enumerate(names)})


def test_generic_folder_without_chambers_is_split_by_file_with_a_message(
    make_image_folder: FolderMaker,
) -> None:
    from twinvae.config import DataConfig
    from twinvae.training.data import prepare_data

    folder = _generic_folder(make_image_folder, [f"cell{i:02d}.png" for i in range(20)])
    config = DataConfig(natural=str(folder), natural_only=True, val_fraction=0.25)
    with pytest.warns(TwinVAEWarning, match=r"cell00\.png.*data\.split_by=file"):
        data = prepare_data(config, seed=0)
    assert len(data.natural_train) + len(data.natural_val) == 20
    assert data.natural_val.labelled.any()


def test_choose_group_by_keeps_chambers_where_there_are_any() -> None:
    chambered = [name for name, _ in chamber_rows(chambers=2, frames=2)]
    plain = ["a.png", "b.png"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no message in these cases
        assert choose_group_by(chambered, "chamber", generic_folder=True) == "chamber"
        assert choose_group_by(plain, "chamber", generic_folder=False) == "chamber"
        assert choose_group_by(plain, "file", generic_folder=True) == "file"
    with pytest.warns(TwinVAEWarning, match="cut by file"):
        assert choose_group_by(plain, "chamber", generic_folder=True, source="x") == "file"


def test_split_by_file_fallback() -> None:
    rows = [(f"cell{i:02d}.png", i % 4) for i in range(20)]
    train, val = split_by_chamber(_image_set(rows), val_fraction=0.25, seed=0, group_by="file")
    assert len(train) + len(val) == 20
    assert val.labelled.sum() == round(0.25 * _image_set(rows).labelled.sum())


# --- Table 1 set names -----------------------------------------------------------------------


def test_set_names_parse_case_insensitively() -> None:
    assert len(SET_NAMES) == 12
    parsed = parse_set_name(" nat-pc-u-TE ")
    assert (parsed.domain, parsed.modality, parsed.labelled, parsed.split) == (
        "natural",
        "pc",
        False,
        "test",
    )
    assert str(parsed) == "Nat-PC-U-Te"
    assert str(parse_set_name("SYN-BF-L-TR")) == "Syn-BF-L-Tr"
    assert all(str(parse_set_name(name)) == name for name in SET_NAMES)
    assert format_set_name("natural", "bf", True, "train") == "Nat-BF-L-Tr"


@pytest.mark.parametrize("bad", ["Syn-PC-U-Tr", "Nat-XX-L-Tr", "Nat-PC-L", "pc-train", ""])
def test_bad_set_names_list_the_valid_ones(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"valid names: Nat-BF-L-Tr, .*Syn-PC-L-Te"):
        parse_set_name(bad)


def test_resolve_natural_set_names(
    make_cho_k1_tree: FolderMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = chamber_rows(chambers=2, frames=3, labelled_every=2)
    root = make_cho_k1_tree(rows, modality="pc", split="test")
    labelled = resolve_set_name("Nat-PC-L-Te", root)
    unlabelled = resolve_set_name("nat-pc-u-te", root / "pc")
    assert labelled.labelled.all() and len(labelled) == sum(1 for _, c in rows if c > 0)
    assert not unlabelled.labelled.any() and len(unlabelled) == sum(1 for _, c in rows if c == 0)
    assert labelled.source.startswith("Nat-PC-L-Te")
    with pytest.raises(DataError, match=r"train\.csv"):
        resolve_set_name("Nat-PC-L-Tr", root)
    monkeypatch.delenv("TWINVAE_CHO_K1", raising=False)
    with pytest.raises(ConfigError, match="Nat-BF-L-Tr needs the CHO-K1 data folder"):
        resolve_set_name("Nat-BF-L-Tr", None)
    monkeypatch.setenv("TWINVAE_CHO_K1", str(root))  # None: the folder $TWINVAE_CHO_K1 names
    assert len(resolve_set_name("Nat-PC-L-Te", None)) == len(labelled)


def test_resolve_synthetic_set_names() -> None:
    pytest.importorskip("twinvae.data.synthetic")
    train = resolve_set_name("Syn-PC-L-Tr", None, synthetic_count=6, seed=5)
    test = resolve_set_name("syn-pc-l-te", None, synthetic_count=6, seed=5)
    assert len(train) == 6 and len(test) == 6
    assert train.domain == "synthetic" and train.modality == "pc"
    assert train.labelled.all()
    assert not np.array_equal(train.images, test.images)
    again = resolve_set_name("Syn-PC-L-Tr", None, synthetic_count=6, seed=5)
    np.testing.assert_array_equal(again.images, train.images)
    assert TEST_SEED_OFFSET > 0


@pytest.mark.real_data
def test_resolve_real_set_name(cho_k1_root: Path) -> None:
    assert len(resolve_set_name("Nat-PC-L-Te", cho_k1_root)) == 398
    assert len(resolve_set_name("Nat-BF-U-Te", cho_k1_root)) == 224
