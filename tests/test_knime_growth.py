"""Growth curves: name parsing, counts per chamber, exponential fits, plot."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from twinvae.knime.scripts import twinvae_growth as growth

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("nd063_cropxy01t005c1.png", ("nd063_crop", 1, 5)),
        ("bf/train_set6/testxy3t098c1.jpg", ("test", 3, 98)),
        ("ExpXY12T300.tif", ("Exp", 12, 300)),
        ("a_xy1t1_b_xy02t007c1.png", ("a_xy1t1_b_", 2, 7)),  # the last xy..t.. wins
    ],
)
def test_parse_time_lapse_name(name: str, parsed: tuple[str, int, int]) -> None:
    assert growth.parse_time_lapse_name(name) == parsed


def test_parse_rejects_names_without_position_and_frame() -> None:
    with pytest.raises(ValueError, match=r"xy<position>t<frame>.*position/frame table"):
        growth.parse_time_lapse_name("image_001.png")


def test_time_lapse_table_sorts_by_chamber_and_frame() -> None:
    table = growth.time_lapse_table(["e1xy2t010c1.png", "e1xy1t002c1.png", "e1xy1t001c1.png"])
    assert list(table["chamber"]) == ["e1xy01", "e1xy01", "e1xy02"]
    assert list(table["frame"]) == [1, 2, 10]


def test_known_growth_rate_and_doubling_time() -> None:
    rate = math.log(2) / 12.0  # doubling every 12 frames
    frames = np.arange(40)
    noise = np.random.default_rng(0).normal(0, 0.03, frames.size)
    counts = 2.0 * np.exp(rate * frames + noise)
    counts[:3] = 0  # frames without cells are ignored by the log fit
    fit = growth.fit_exponential("c1", frames, counts, frame_interval_minutes=15.0)
    assert fit.points == 37
    assert fit.rate_per_frame == pytest.approx(rate, rel=0.02)
    assert fit.doubling_time_frames == pytest.approx(12.0, rel=0.02)
    assert fit.rate_per_hour == pytest.approx(rate * 4, rel=0.02)
    assert fit.doubling_time_hours == pytest.approx(3.0, rel=0.02)
    assert fit.initial_count == pytest.approx(2.0, rel=0.1)
    assert fit.r_squared > 0.98


def test_no_growth_and_too_few_points_are_reported() -> None:
    flat = growth.fit_exponential("flat", [0, 1, 2, 3], [5, 4, 5, 4])
    assert flat.rate_per_frame <= 0 and math.isnan(flat.doubling_time_frames)
    assert "no growth" in flat.note
    empty = growth.fit_exponential("empty", [0, 1, 2], [0, 0, 3])
    assert math.isnan(empty.rate_per_frame) and "fewer than two" in empty.note
    assert math.isnan(flat.rate_per_hour)  # no frame interval given


def test_chamber_counts_and_fit_all_table() -> None:
    table = pd.DataFrame(
        {
            "chamber": ["a", "a", "a", "b", "b", "b"],
            "frame": [0, 1, 1, 0, 1, 2],
            "count": [1.0, 1.0, 1.0, 2.0, 4.0, 8.0],
        }
    )
    per_frame = growth.chamber_counts(table)
    assert per_frame.to_dict("records")[:2] == [
        {"chamber": "a", "frame": 0, "count": 1.0, "images": 1},
        {"chamber": "a", "frame": 1, "count": 2.0, "images": 2},
    ]
    fits = growth.fit_all(per_frame, frame_interval_minutes=30.0)
    assert list(fits["chamber"]) == ["a", "b"]
    assert fits.loc[1, "doubling_time_frames"] == pytest.approx(1.0)
    assert fits.loc[1, "doubling_time_hours"] == pytest.approx(0.5)
    png = growth.growth_plot_png(per_frame, fits)
    assert png.startswith(PNG_SIGNATURE)


def test_position_table_reading(tmp_path: Path) -> None:
    good = tmp_path / "positions.csv"
    good.write_text("file,position,frame\nimg_b.png,2,0\nimg_a.png,1,1\nimg_c.png,1,0\n")
    table = growth.read_position_table(good)
    assert list(table["file"]) == ["img_c.png", "img_a.png", "img_b.png"]
    assert list(table["chamber"]) == ["xy01", "xy01", "xy02"]
    bad = tmp_path / "bad.csv"
    bad.write_text("file,position,frame\nx.png,1,0\ny.png,one,1\n")
    with pytest.raises(ValueError, match="line 3: position"):
        growth.read_position_table(bad)
    (tmp_path / "cols.csv").write_text("file,frame\nx.png,0\n")
    with pytest.raises(ValueError, match=r"lacks the columns \['position'\]"):
        growth.read_position_table(tmp_path / "cols.csv")


@pytest.mark.real_data
def test_real_cho_k1_names_parse_into_chambers_and_frames() -> None:
    root = Path(
        os.environ.get("TWINVAE_CHO_K1", Path(__file__).resolve().parents[2] / "shared/data/cho-k1")
    )
    if not root.is_dir():
        pytest.skip(f"real CHO-K1 data not found at {root} (set TWINVAE_CHO_K1)")
    files = sorted(str(path) for path in (root / "pc" / "test").glob("*.png"))
    assert files, f"no PNG images in {root / 'pc' / 'test'}"
    table = growth.time_lapse_table(files)
    assert len(table) == len(files)
    assert table["chamber"].str.startswith("nd063_cropxy").all()
    assert table.groupby("chamber")["frame"].nunique().min() > 1
