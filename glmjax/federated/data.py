"""Multi-view data for APFed: one view per party, samples aligned by shared ids.

Built-in data sets ship inside scikit-learn (no download):
  * ``digits``: 1797 8x8 grey images, 10 classes, cut into ``num_views`` horizontal strips
    (rows split as evenly as possible: 3 strips -> rows 0-2, 3-5, 6-7); pixel values / 16.
  * ``breast_cancer``: 569 samples, 30 tabular features, 2 classes, split by feature columns into
    ``num_views`` groups (3 groups = the "mean", "standard error" and "worst" features);
    each party standardises its own columns with its own statistics.

A user's data: one CSV or NPZ file per party with an id column (see ``load_party_file``).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os

import gin
import numpy as np


class FederatedDataError(ValueError):
    """Bad party data; the message names the file, line/row and column."""


class IdMismatchError(FederatedDataError):
    """Two parties' sample ids differ; the message gives counts and a few examples."""


@dataclasses.dataclass(frozen=True)
class PartyData:
    """One party's rows.

    Attributes:
      ids: (N,) unicode sample ids, unique.
      x: (N, D) float32 features of this party's view.
      labels: (N,) int32 class labels (the active party only) or None.
      source: where the rows came from, for messages.
    """

    ids: np.ndarray
    x: np.ndarray
    labels: np.ndarray | None
    source: str

    def __post_init__(self):
        if self.ids.ndim != 1 or self.x.ndim != 2 or len(self.ids) != len(self.x):
            raise FederatedDataError(
                f"{self.source}: ids {self.ids.shape} and x {self.x.shape} must be (N,) and (N, D)")
        if self.labels is not None and self.labels.shape != self.ids.shape:
            raise FederatedDataError(f"{self.source}: labels {self.labels.shape} != ids {self.ids.shape}")

    @property
    def num_classes(self) -> int:
        if self.labels is None:
            raise FederatedDataError(f"{self.source}: has no labels")
        return int(self.labels.max()) + 1

    def take(self, index: np.ndarray) -> "PartyData":
        """The rows at ``index`` (any integer index array), in that order."""
        return PartyData(self.ids[index], self.x[index],
                         None if self.labels is None else self.labels[index], self.source)


# ----------------------------------------------------------------------------- built-in data sets

def image_strip_views(images: np.ndarray, num_views: int) -> list[np.ndarray]:
    """Cuts (N, H, W) images into ``num_views`` horizontal strips, each flattened to (N, h_v * W)."""
    if not 1 <= num_views <= images.shape[1]:
        raise FederatedDataError(f"num_views={num_views}: must be in 1..{images.shape[1]} (image rows)")
    return [strip.reshape(len(images), -1) for strip in np.array_split(images, num_views, axis=1)]


def _digits_views(num_views: int) -> tuple[list[np.ndarray], np.ndarray]:
    from sklearn.datasets import load_digits
    bunch = load_digits()
    return image_strip_views(bunch.images.astype(np.float32) / 16.0, num_views), bunch.target


def _breast_cancer_views(num_views: int) -> tuple[list[np.ndarray], np.ndarray]:
    from sklearn.datasets import load_breast_cancer
    bunch = load_breast_cancer()
    if not 1 <= num_views <= bunch.data.shape[1]:
        raise FederatedDataError(f"num_views={num_views}: must be in 1..{bunch.data.shape[1]} (columns)")
    views = []
    for cols in np.array_split(bunch.data, num_views, axis=1):
        views.append(((cols - cols.mean(0)) / cols.std(0)).astype(np.float32))
    return views, bunch.target


_BUILTIN = {"digits": _digits_views, "breast_cancer": _breast_cancer_views}


def builtin_party(dataset: str, view: int, num_views: int, with_labels: bool) -> PartyData:
    """One party's view of a built-in data set; ids are ``"{dataset}-{row:05d}"``."""
    if dataset not in _BUILTIN:
        raise FederatedDataError(f"dataset={dataset!r}: expected one of {sorted(_BUILTIN)}")
    views, target = _BUILTIN[dataset](num_views)
    if not 0 <= view < num_views:
        raise FederatedDataError(f"view={view}: must be in 0..{num_views - 1}")
    ids = np.array([f"{dataset}-{i:05d}" for i in range(len(target))])
    labels = target.astype(np.int32) if with_labels else None
    return PartyData(ids, views[view], labels, f"{dataset} view {view}/{num_views}")


# ----------------------------------------------------------------------------- user files

def _parse_float(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise FederatedDataError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise FederatedDataError(f"{where}: {text!r} is not finite")
    return value


def _parse_label(text: str, where: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise FederatedDataError(f"{where}: {text!r} is not an integer class label") from None
    if value < 0:
        raise FederatedDataError(f"{where}: class label {value} is negative")
    return value


def _load_csv(path: str, id_column: str, label_column: str | None) -> PartyData:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise FederatedDataError(f"{path}: empty file, expected a header row with a {id_column!r} column")
    header = [name.strip() for name in rows[0]]
    if id_column not in header:
        raise FederatedDataError(f"{path}, line 1: no {id_column!r} column in the header {header}")
    if label_column is not None and label_column not in header:
        raise FederatedDataError(f"{path}, line 1: no label column {label_column!r} in the header {header}")
    id_at = header.index(id_column)
    label_at = header.index(label_column) if label_column is not None else None
    feature_at = [i for i in range(len(header)) if i not in (id_at, label_at)]
    if not feature_at:
        raise FederatedDataError(f"{path}, line 1: no feature columns besides {id_column!r}")
    ids, feats, labels, first_line = [], [], [], {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise FederatedDataError(f"{path}, line {line}: {len(row)} fields, the header has {len(header)}")
        sample_id = row[id_at].strip()
        if not sample_id:
            raise FederatedDataError(f"{path}, line {line}, column {id_column!r}: empty id")
        if sample_id in first_line:
            raise FederatedDataError(f"{path}, line {line}, column {id_column!r}: duplicate id "
                                     f"{sample_id!r} (first on line {first_line[sample_id]})")
        first_line[sample_id] = line
        ids.append(sample_id)
        feats.append([_parse_float(row[i], f"{path}, line {line}, column {header[i]!r}") for i in feature_at])
        if label_at is not None:
            labels.append(_parse_label(row[label_at].strip(), f"{path}, line {line}, column {label_column!r}"))
    if not ids:
        raise FederatedDataError(f"{path}: no data rows after the header")
    return PartyData(np.array(ids), np.asarray(feats, np.float32),
                     np.asarray(labels, np.int32) if label_at is not None else None, path)


def _load_npz(path: str, id_column: str, label_column: str | None) -> PartyData:
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as err:  # zipfile.BadZipFile, ValueError, OSError
        raise FederatedDataError(f"{path}: not a readable .npz archive ({err})") from None
    with archive:
        for key in (id_column, "x") + ((label_column,) if label_column else ()):
            if key not in archive.files:
                raise FederatedDataError(f"{path}: no array {key!r} (arrays: {sorted(archive.files)})")
        ids, x = archive[id_column], archive["x"]
        labels = archive[label_column] if label_column else None
    if ids.ndim != 1:
        raise FederatedDataError(f"{path}, array {id_column!r}: must be 1-D, got shape {ids.shape}")
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        raise FederatedDataError(f"{path}, array 'x': must be a 2-D numeric (rows, features) array, "
                                 f"got {x.dtype} {x.shape}")
    if len(x) != len(ids):
        raise FederatedDataError(f"{path}: {id_column!r} has {len(ids)} rows, 'x' has {len(x)}")
    if len(ids) == 0:
        raise FederatedDataError(f"{path}: no rows")
    bad = np.argwhere(~np.isfinite(x))
    if len(bad):
        r, c = bad[0]
        raise FederatedDataError(f"{path}, array 'x', row {r}, column {c}: {x[r, c]} is not finite")
    ids = ids.astype(str)
    _check_unique(ids, lambda i: f"{path}, array {id_column!r}, row {i}")
    if labels is not None:
        if labels.shape != ids.shape or not np.issubdtype(labels.dtype, np.integer):
            raise FederatedDataError(f"{path}, array {label_column!r}: must be integer with shape "
                                     f"{ids.shape}, got {labels.dtype} {labels.shape}")
        if (labels < 0).any():
            r = int(np.argmax(labels < 0))
            raise FederatedDataError(f"{path}, array {label_column!r}, row {r}: class label {labels[r]} is negative")
        labels = labels.astype(np.int32)
    return PartyData(ids, x.astype(np.float32), labels, path)


def _check_unique(ids: np.ndarray, where) -> None:
    seen: dict[str, int] = {}
    for i, sample_id in enumerate(ids.tolist()):
        if sample_id in seen:
            raise FederatedDataError(f"{where(i)}: duplicate id {sample_id!r} (first at row {seen[sample_id]})")
        seen[sample_id] = i


def load_party_file(path: str, id_column: str = "id", label_column: str | None = None) -> PartyData:
    """Loads one party's rows from a CSV or NPZ file.

    CSV: a header row; ``id_column`` holds unique sample ids, ``label_column`` (the active party
    only) integer class labels >= 0, every other column is a numeric feature.
    NPZ: arrays ``id_column`` (N,), ``x`` (N, D) numeric and, for the active party,
    ``label_column`` (N,) integer.

    Raises:
      FileNotFoundError: no such file.
      FederatedDataError: naming the file, line (CSV, 1-based, header = line 1) or row (NPZ, 0-based)
        and column of the first bad value.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such party data file")
    if path.endswith(".csv"):
        return _load_csv(path, id_column, label_column)
    if path.endswith(".npz"):
        return _load_npz(path, id_column, label_column)
    raise FederatedDataError(f"{path}: expected a .csv or .npz file")


@gin.configurable
def party_data(dataset: str | None = None, view: int = 0, num_views: int = 3, path: str | None = None,
               id_column: str = "id", label_column: str | None = None, with_labels: bool = False) -> PartyData:
    """This party's data: a built-in ``dataset`` view or a user's ``path`` (exactly one of them).

    ``with_labels`` (built-in sets) / ``label_column`` (files) are for the active party only.
    """
    if (dataset is None) == (path is None):
        raise FederatedDataError("party_data: set exactly one of dataset= (built-in) or path= (CSV/NPZ)")
    if dataset is not None:
        return builtin_party(dataset, view, num_views, with_labels)
    return load_party_file(path, id_column, label_column)


# ----------------------------------------------------------------------------- ids

def train_test_split(ids: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, test) of a seeded split that depends on the id set only (not row order)."""
    if not 0.0 < test_fraction < 1.0:
        raise FederatedDataError(f"test_fraction={test_fraction}: must be in (0, 1)")
    order = np.argsort(ids, kind="stable")
    perm = order[np.random.default_rng(seed).permutation(len(ids))]
    num_test = max(1, int(round(test_fraction * len(ids))))
    return np.sort(perm[num_test:]), np.sort(perm[:num_test])


def align_ids(reference: np.ndarray, own: np.ndarray, party: str, examples: int = 5) -> np.ndarray:
    """Index into ``own`` that puts its rows in ``reference`` order (``own[index] == reference``).

    Raises:
      IdMismatchError: the two id sets differ: counts on both sides and a few ids of each difference.
    """
    ref_set, own_set = set(reference.tolist()), set(own.tolist())
    if len(ref_set) != len(reference):
        raise IdMismatchError(f"{party}: the active party's ids contain duplicates")
    if ref_set != own_set:
        only_ref = sorted(ref_set - own_set)
        only_own = sorted(own_set - ref_set)
        raise IdMismatchError(
            f"sample ids differ between the active party ({len(ref_set)} ids) and {party} ({len(own_set)} ids): "
            f"{len(only_ref)} only in the active party (e.g. {only_ref[:examples]}), "
            f"{len(only_own)} only in {party} (e.g. {only_own[:examples]})")
    position = {sample_id: i for i, sample_id in enumerate(own.tolist())}
    return np.array([position[sample_id] for sample_id in reference.tolist()], np.int64)
