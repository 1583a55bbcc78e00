"""Region features for VinVL (``ptscale.models.vinvl``): per image, the detector's regions and object tags.

Layout of ``data.region_features`` (one pair of files per image, named by the record's ``image_id``)::

    <dir>/<image_id>.npy   float array, num_regions x (feature_dim + 6), num_regions >= 1:
                           columns 0 .. feature_dim-1: the region's appearance feature (VinVL: 2048),
                           the last 6: its box x1/W, y1/H, x2/W, y2/H, (x2-x1)/W, (y2-y1)/H
                           (corners in pixels divided by the image width W / height H), as VinVL's
                           released features (2054 values per region)
    <dir>/<image_id>.json  {"tags": ["dog", "frisbee", ...]}: the object tags (detected class names), in
                           the detector's order; may be empty

``feature_dim + 6`` must equal the model's ``img_feature_dim``. A missing or malformed file is a
:class:`ptscale.errors.DataError` (one line naming the file and the fix; exit code 3).

Without ``data.region_features`` the synthetic task makes its own (:func:`synthetic_regions`): one region per
rendered shape (its box, and a fixed random projection of its pixels) plus the whole image, and the shapes'
names as tags.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ptscale.errors import DataError

BOX_VALUES = 6
REGIONS_VERSION = 1  # bump when synthetic_regions changes: the tiny VinVL default's cache key includes it
PROJECTION_SEED = 20240607
CROP = 6  # a region's pixels are resized to CROP x CROP before the projection


def _bad(path: Path, problem: str) -> DataError:
    return DataError(f"{path}: {problem}; region features are <image_id>.npy (num_regions x (feature_dim + 6)) "
                     "and <image_id>.json ({\"tags\": [...]}) per image (README 'Region features')")


def read_regions(directory: str | Path, image_id: str, img_feature_dim: int, *,
                 header_only: bool = False) -> tuple[np.ndarray, list[str]]:
    """(features float32 (num_regions, img_feature_dim), tags) of one image; DataError naming the file.
    ``header_only``: check the array's shape and dtype without reading its values (a whole dataset's files are
    checked this way before training; the values are checked when a batch reads them)."""
    directory = Path(directory)
    npy, tags_file = directory / f"{image_id}.npy", directory / f"{image_id}.json"
    if not npy.is_file():
        raise _bad(npy, f"missing (the region features of image {image_id})")
    try:
        features = np.load(npy, allow_pickle=False, mmap_mode="r" if header_only else None)
    except (ValueError, OSError, EOFError) as e:
        raise _bad(npy, f"not a readable .npy array ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    if features.ndim != 2 or features.shape[0] < 1 or features.shape[1] != img_feature_dim:
        raise _bad(npy, f"shape {features.shape}, expected (num_regions >= 1, {img_feature_dim}) for this model "
                        f"({img_feature_dim - BOX_VALUES} feature values + {BOX_VALUES} box values)")
    if not np.issubdtype(features.dtype, np.floating) or (not header_only and not np.isfinite(features).all()):
        raise _bad(npy, f"dtype {features.dtype} or non-finite values; expected finite floats")
    if not tags_file.is_file():
        raise _bad(tags_file, f"missing (the object tags of image {image_id})")
    try:
        raw = json.loads(tags_file.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise _bad(tags_file, f"not valid JSON ({e})") from None
    tags = raw.get("tags") if isinstance(raw, dict) else None
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise _bad(tags_file, "no \"tags\" list of strings")
    return (features if header_only else features.astype(np.float32)), tags


def box_values(x1: float, y1: float, x2: float, y2: float, width: int, height: int) -> list[float]:
    """VinVL's 6 box values of a box in pixels."""
    return [x1 / width, y1 / height, x2 / width, y2 / height, (x2 - x1) / width, (y2 - y1) / height]


def _projection(feature_dim: int) -> np.ndarray:
    rng = np.random.default_rng(PROJECTION_SEED)
    return rng.standard_normal((CROP * CROP * 3, feature_dim)).astype(np.float32) / np.sqrt(CROP * CROP * 3)


def synthetic_regions(scene, image, feature_dim: int) -> tuple[np.ndarray, list[str]]:
    """The synthetic task's regions of one rendered scene: per shape its box (the cell it is drawn in, one pixel of
    margin for the rendering jitter) and a fixed random projection of its pixels, then the whole image; tags: the
    shapes' names."""
    from PIL import Image

    from ptscale.data.synthetic import SIZES

    width, height = image.size
    boxes = []
    for o in scene:
        cy, cx, r = 8 + 16 * o.cell[0], 8 + 16 * o.cell[1], SIZES[o.size] + 1
        boxes.append((max(0, cx - r), max(0, cy - r), min(width, cx + r + 1), min(height, cy + r + 1)))
    boxes.append((0, 0, width, height))
    projection = _projection(feature_dim)
    rows = []
    for box in boxes:
        pixels = np.asarray(image.crop(box).resize((CROP, CROP), Image.BILINEAR), dtype=np.float32) / 255.0
        rows.append(np.concatenate([pixels.reshape(-1) @ projection, box_values(*box, width, height)]))
    return np.stack(rows).astype(np.float32), [o.shape for o in scene]
