"""APFed data: built-in multi-view sets, per-party CSV/NPZ files and their errors, id alignment."""

import numpy as np
import pytest

from glmjax.federated.data import (FederatedDataError, IdMismatchError, PartyData, align_ids, builtin_party,
                                   image_strip_views, load_party_file, party_data, train_test_split)


def test_digits_strips_partition_the_image():
    views = [builtin_party("digits", v, 3, with_labels=(v == 0)) for v in range(3)]
    assert [v.x.shape for v in views] == [(1797, 24), (1797, 24), (1797, 16)]
    assert views[0].labels is not None and views[1].labels is None
    from sklearn.datasets import load_digits
    images = load_digits().images / 16.0
    np.testing.assert_allclose(np.concatenate([v.x for v in views], axis=1), images.reshape(1797, 64), rtol=1e-6)
    np.testing.assert_array_equal(views[0].ids, views[2].ids)
    assert [s.shape[1] for s in image_strip_views(np.zeros((2, 8, 8)), 2)] == [32, 32]
    with pytest.raises(FederatedDataError, match="num_views=9"):
        image_strip_views(np.zeros((2, 8, 8)), 9)


def test_breast_cancer_feature_groups_are_standardised_per_party():
    error_view = builtin_party("breast_cancer", 1, 3, with_labels=True)
    assert error_view.x.shape == (569, 10) and error_view.num_classes == 2
    np.testing.assert_allclose(error_view.x.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(error_view.x.std(0), 1.0, atol=1e-4)
    with pytest.raises(FederatedDataError, match="dataset='olivetti'"):
        builtin_party("olivetti", 0, 2, True)
    with pytest.raises(FederatedDataError, match="exactly one"):
        party_data()


def test_split_depends_on_the_id_set_not_the_row_order():
    ids = np.array([f"s{i}" for i in range(50)])
    train, test = train_test_split(ids, 0.2, seed=3)
    assert len(test) == 10 and len(train) == 40 and not set(train) & set(test)
    perm = np.random.default_rng(0).permutation(50)
    train2, test2 = train_test_split(ids[perm], 0.2, seed=3)
    assert set(ids[test]) == set(ids[perm][test2])
    assert set(ids[test]) != set(ids[train_test_split(ids, 0.2, seed=4)[1]])


def test_align_ids_reorders_and_names_the_difference():
    reference = np.array(["a", "b", "c", "d"])
    own = np.array(["c", "a", "d", "b"])
    index = align_ids(reference, own, "passive party 'p'")
    np.testing.assert_array_equal(own[index], reference)
    with pytest.raises(IdMismatchError) as err:
        align_ids(reference, np.array(["a", "b", "x", "y", "z"]), "passive party 'p'")
    message = str(err.value)
    assert "\n" not in message
    assert "(4 ids) and passive party 'p' (5 ids)" in message
    assert "2 only in the active party (e.g. ['c', 'd'])" in message
    assert "3 only in passive party 'p' (e.g. ['x', 'y', 'z'])" in message


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_csv_loader_reads_ids_features_and_labels(tmp_path):
    path = _write(tmp_path / "a.csv", "id,f1,label,f2\nu1,0.5,1,2\nu2,-1,0,3e-1\n")
    data = load_party_file(path, label_column="label")
    np.testing.assert_array_equal(data.ids, ["u1", "u2"])
    np.testing.assert_allclose(data.x, [[0.5, 2.0], [-1.0, 0.3]])
    np.testing.assert_array_equal(data.labels, [1, 0])
    assert load_party_file(path).x.shape == (2, 3)  # no label column: every other column is a feature


@pytest.mark.parametrize("text,label,match", [
    ("", None, r"a\.csv: empty file"),
    ("key,f1\n1,2\n", None, r"a\.csv, line 1: no 'id' column in the header \['key', 'f1'\]"),
    ("id,f1\n1,2\n", "y", r"a\.csv, line 1: no label column 'y'"),
    ("id\n1\n", None, r"a\.csv, line 1: no feature columns"),
    ("id,f1,f2\n1,2,3\n2,4\n", None, r"a\.csv, line 3: 2 fields, the header has 3"),
    ("id,f1,f2\n1,2,3\n2,4,abc\n", None, r"a\.csv, line 3, column 'f2': 'abc' is not a number"),
    ("id,f1\n1,nan\n", None, r"a\.csv, line 2, column 'f1': 'nan' is not finite"),
    ("id,f1\n1,2\n\n7,3\n1,4\n", None, r"a\.csv, line 5, column 'id': duplicate id '1' \(first on line 2\)"),
    ("id,f1\n,2\n", None, r"a\.csv, line 2, column 'id': empty id"),
    ("id,f1,y\n1,2,1.5\n", "y", r"a\.csv, line 2, column 'y': '1.5' is not an integer class label"),
    ("id,f1,y\n1,2,-1\n", "y", r"a\.csv, line 2, column 'y': class label -1 is negative"),
    ("id,f1\n", None, r"a\.csv: no data rows"),
])
def test_csv_errors_name_file_line_and_column(tmp_path, text, label, match):
    path = _write(tmp_path / "a.csv", text)
    with pytest.raises(FederatedDataError, match=match) as err:
        load_party_file(path, label_column=label)
    assert "\n" not in str(err.value)


def test_npz_loader_and_its_errors(tmp_path):
    path = str(tmp_path / "p.npz")
    np.savez(path, id=np.array([3, 1, 2]), x=np.ones((3, 2)), y=np.array([0, 1, 1]))
    data = load_party_file(path, label_column="y")
    np.testing.assert_array_equal(data.ids, ["3", "1", "2"])
    assert data.x.dtype == np.float32 and data.labels.tolist() == [0, 1, 1]
    cases = [
        (dict(ids=np.arange(2), x=np.ones((2, 2))), r"p\.npz: no array 'id' \(arrays: \['ids', 'x'\]\)"),
        (dict(id=np.arange(2), x=np.ones(2)), r"p\.npz, array 'x': must be a 2-D numeric"),
        (dict(id=np.arange(3), x=np.ones((2, 2))), r"p\.npz: 'id' has 3 rows, 'x' has 2"),
        (dict(id=np.arange(2), x=np.array([[1.0, 2.0], [3.0, np.inf]])), r"p\.npz, array 'x', row 1, column 1: inf"),
        (dict(id=np.array([5, 6, 5]), x=np.ones((3, 1))), r"p\.npz, array 'id', row 2: duplicate id '5' \(first at row 0\)"),
    ]
    for arrays, match in cases:
        np.savez(path, **arrays)
        with pytest.raises(FederatedDataError, match=match):
            load_party_file(path)
    np.savez(path, id=np.arange(2), x=np.ones((2, 2)), y=np.array([0.5, 1.0]))
    with pytest.raises(FederatedDataError, match=r"array 'y': must be integer"):
        load_party_file(path, label_column="y")
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load_party_file(str(tmp_path / "missing.csv"))
    bad = _write(tmp_path / "b.npz", "not a zip")
    with pytest.raises(FederatedDataError, match=r"b\.npz: not a readable \.npz"):
        load_party_file(bad)
    with pytest.raises(FederatedDataError, match=r"expected a \.csv or \.npz"):
        load_party_file(_write(tmp_path / "c.txt", "x"))


def test_party_data_rejects_inconsistent_shapes():
    with pytest.raises(FederatedDataError, match="must be"):
        PartyData(np.array(["a"]), np.ones((2, 2), np.float32), None, "src")
