"""helpers.data: loading by flag and size, verification errors, subsets, TensorLoader, k-fold."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from medmnist.info import INFO

from helpers import data
from helpers.data import DataError, Split, TensorLoader


# ---- loading every task type ---------------------------------------------------------------
@pytest.mark.parametrize("flag", ["breastmnist", "organamnist", "chestmnist", "retinamnist",
                                  "pathmnist", "dermamnist"])
def test_load_generated_task_types(tmp_path, make_npz, flag):
    n = (30, 10, 12)
    make_npz(tmp_path, flag, n=n, seed=1)
    ds = data.load(flag, root=tmp_path, verify=False, download=False)
    meta = INFO[flag]
    assert ds.task == meta["task"]
    assert ds.n_channels == meta["n_channels"]
    assert ds.n_classes == len(meta["label"])
    assert ds.multilabel == (flag == "chestmnist")
    with np.load(tmp_path / f"{flag}.npz") as raw:
        for split, count in zip(data.SPLITS, n):
            s = ds[split]
            assert len(s) == count
            assert s.images.dtype == torch.uint8
            assert s.images.shape == (count, meta["n_channels"], 28, 28)
            # pixel values are the file's, moved to NCHW
            img = raw[f"{split}_images"]
            expect = img[:, None] if img.ndim == 3 else img.transpose(0, 3, 1, 2)
            assert np.array_equal(s.images.numpy(), expect)
            if ds.multilabel:
                assert s.labels.dtype == torch.float32
                assert s.labels.shape == (count, len(meta["label"]))
                assert np.array_equal(s.labels.numpy(), raw[f"{split}_labels"].astype(np.float32))
            else:
                assert s.labels.dtype == torch.int64
                assert s.labels.shape == (count,)
                assert np.array_equal(s.labels.numpy(), raw[f"{split}_labels"][:, 0])
            assert torch.equal(s.index, torch.arange(count))
    counts = ds.class_counts("train")
    assert counts.sum() == (ds["train"].labels.sum().item() if ds.multilabel else n[0])


def test_load_size_64_uses_medmnist_name(tmp_path, make_npz):
    path = make_npz(tmp_path, "dermamnist", size=64, n=(8, 4, 4))
    assert path.name == "dermamnist_64.npz"
    ds = data.load("dermamnist", size=64, root=tmp_path, verify=False, download=False)
    assert ds["train"].images.shape == (8, 3, 64, 64)
    assert ds.summary()["size"] == 64
    # the 28 px file is a different file: absent here
    with pytest.raises(DataError, match="dermamnist.npz"):
        data.load("dermamnist", size=28, root=tmp_path, verify=False, download=False)


def test_file_names_and_md5_table():
    assert data.file_name("organamnist") == "organamnist.npz"
    assert data.file_name("organamnist", 224) == "organamnist_224.npz"
    assert data.expected_md5("pathmnist", 128) == INFO["pathmnist"]["MD5_128"]
    with pytest.raises(DataError, match="sizes"):
        data.file_name("organamnist", 32)


def test_wrong_size_inside_file_is_refused(tmp_path, make_npz):
    # a 28 px file saved under the 64 px name
    src = make_npz(tmp_path / "src", "breastmnist", size=28, n=(4, 2, 2))
    shutil.copy(src, tmp_path / "breastmnist_64.npz")
    with pytest.raises(DataError, match="64px"):
        data.load("breastmnist", size=64, root=tmp_path, verify=False, download=False)


def test_data_root_from_environment(tmp_path, make_npz, monkeypatch):
    make_npz(tmp_path, "pneumoniamnist", n=(6, 2, 2))
    monkeypatch.setenv("RLMED_DATA", str(tmp_path))
    ds = data.load("pneumoniamnist", verify=False, download=False)
    assert len(ds["train"]) == 6


def test_real_breastmnist_verified(shared_data):
    ds = data.load("breastmnist", root=shared_data, verify=True, download=False)
    assert {s: len(ds[s]) for s in data.SPLITS} == {"train": 546, "val": 78, "test": 156}
    assert ds["train"].images.shape == (546, 1, 28, 28)
    assert ds["train"].images.dtype == torch.uint8
    assert ds["train"].labels.dtype == torch.int64
    assert ds.class_counts("train").tolist() == [147, 399]
    assert ds.class_counts("test").tolist() == [42, 114]


# ---- errors: missing, corrupt, unreadable, unknown ----------------------------------------------
def _assert_missing_message(msg: str, tmp_path):
    assert "breastmnist.npz" in msg
    assert INFO["breastmnist"]["MD5"] in msg
    assert str(tmp_path) in msg
    assert "Fix:" in msg and "RLMED_DATA" in msg


def test_missing_file_without_download(tmp_path):
    with pytest.raises(DataError) as err:
        data.load("breastmnist", root=tmp_path, download=False)
    msg = str(err.value)
    _assert_missing_message(msg, tmp_path)
    assert "not attempted" in msg


def test_missing_file_download_fails(tmp_path, monkeypatch):
    calls = []

    def fake_download(flag, size, root):
        calls.append((flag, size, root))
        return ConnectionError("no network in the test")

    monkeypatch.setattr(data, "_try_download", fake_download)
    with pytest.raises(DataError) as err:
        data.load("breastmnist", root=tmp_path, download=True)
    assert calls == [("breastmnist", 28, tmp_path.resolve())]
    msg = str(err.value)
    _assert_missing_message(msg, tmp_path)
    assert "download failed" in msg and "no network in the test" in msg


def test_download_that_writes_the_file_is_used(tmp_path, monkeypatch, make_npz):
    def fake_download(flag, size, root):
        make_npz(root, flag, size, n=(4, 2, 2))
        return None

    monkeypatch.setattr(data, "_try_download", fake_download)
    ds = data.load("breastmnist", root=tmp_path, download=True, verify=False)
    assert len(ds["train"]) == 4


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_file_md5_mismatch(tmp_path, shared_data, damage):
    path = tmp_path / "breastmnist.npz"
    raw = bytearray((shared_data / "breastmnist.npz").read_bytes())
    if damage == "flip":
        for i in range(200_000, 200_016):
            raw[i] ^= 0xFF
    else:
        raw = raw[: len(raw) // 2]
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError) as err:
        data.load("breastmnist", root=tmp_path, download=False, verify=True)
    msg = str(err.value)
    assert "MD5" in msg and INFO["breastmnist"]["MD5"] in msg
    assert data.md5sum(path) in msg
    assert "corrupt" in msg and "Fix:" in msg


@pytest.mark.parametrize("offset", [None, 1000, 200_000])
def test_unreadable_file_without_verify(tmp_path, shared_data, offset):
    """A damaged file read with verify=False is a DataError 'cannot read', never a raw zip/zlib error."""
    raw = bytearray((shared_data / "breastmnist.npz").read_bytes())
    if offset is None:
        raw = raw[: len(raw) // 3]
    else:  # bytes flipped inside a deflate stream (zlib.error) or a member (bad CRC)
        for i in range(offset, offset + 64):
            raw[i] ^= 0xFF
    (tmp_path / "breastmnist.npz").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="cannot read") as err:
        data.load("breastmnist", root=tmp_path, download=False, verify=False)
    assert "breastmnist.npz" in str(err.value)


def test_unknown_flag_lists_valid_flags(tmp_path):
    with pytest.raises(DataError) as err:
        data.load("brestmnist", root=tmp_path, download=False)
    msg = str(err.value)
    assert "brestmnist" in msg
    for flag in ("breastmnist", "organamnist", "chestmnist", "pathmnist"):
        assert flag in msg
    assert "organmnist3d" not in msg
    with pytest.raises(DataError):
        data.info("organmnist3d")


# ---- subsample ---------------------------------------------------------------------------
def _fake_dataset(labels_by_split, size=4):
    splits = {}
    for name, labels in labels_by_split.items():
        labels = torch.as_tensor(labels)
        n = len(labels)
        imgs = torch.arange(n, dtype=torch.int64).view(n, 1, 1, 1).expand(n, 1, size, size) % 256
        splits[name] = Split(imgs.to(torch.uint8).contiguous(), labels)
    return data.MedMNIST("breastmnist", 28, "binary-class", 1, {"0": "a", "1": "b"}, splits)


def test_subsample_stratified_and_keeps_indices():
    rng = np.random.default_rng(0)
    train = torch.as_tensor(rng.permutation(np.r_[np.zeros(800), np.ones(200)]).astype(np.int64))
    ds = _fake_dataset({"train": train, "val": torch.tensor([0, 1] * 20), "test": torch.tensor([0, 1] * 5)})
    sub = data.subsample(ds, {"train": 100, "val": 10, "test": None}, seed=3)
    t = sub["train"]
    assert len(t) == 100
    assert t.labels.bincount().tolist() == [80, 20]  # proportions kept exactly
    idx = t.index.numpy()
    assert len(np.unique(idx)) == 100 and np.all(np.diff(idx) > 0)  # sorted, no repeats
    assert torch.equal(t.labels, train[t.index])  # the official indices point at the same labels
    assert torch.equal(t.images[:, 0, 0, 0].long(), t.index % 256)  # and at the same images
    assert len(sub["val"]) == 10 and sub["val"].labels.bincount().tolist() == [5, 5]
    assert sub["test"] is ds["test"]
    again = data.subsample(ds, {"train": 100, "val": 10, "test": None}, seed=3)
    assert torch.equal(again["train"].index, t.index)
    other = data.subsample(ds, {"train": 100, "val": 10, "test": None}, seed=4)
    assert not torch.equal(other["train"].index, t.index)


def test_subsample_rare_class_kept_and_nested_take():
    labels = torch.tensor([0] * 97 + [1] * 3)
    ds = _fake_dataset({"train": labels})
    sub = data.subsample(ds, {"train": 10}, seed=0)
    assert len(sub["train"]) == 10
    assert (sub["train"].labels == 1).sum() >= 1
    # a take of a take keeps the official positions
    sub2 = sub["train"].take([1, 3])
    assert torch.equal(sub2.index, sub["train"].index[[1, 3]])


# ---- TensorLoader -----------------------------------------------------------------------------
def _ids_split(n=50, classes=(0, 1), size=4, channels=1):
    """Images whose every pixel is the sample id (so a batch tells which samples it holds)."""
    ids = torch.arange(n)
    imgs = ids.view(n, 1, 1, 1).expand(n, channels, size, size).to(torch.uint8).contiguous()
    labels = torch.as_tensor([classes[i % len(classes)] for i in range(n)])
    return Split(imgs, labels)


def _ids_of(x, mean=0.5, std=0.5):
    return torch.round((x[:, 0, 0, 0] * std + mean) * 255).long()


def test_loader_batches_and_normalisation():
    split = _ids_split(50, channels=3)
    loader = TensorLoader(split, 16)
    batches = list(loader)
    assert len(loader) == 4 == len(batches)
    assert [len(y) for _, y in batches] == [16, 16, 16, 2]
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape == (16, 3, 4, 4) and y.dtype == torch.int64
    assert torch.equal(_ids_of(x), torch.arange(16))
    # uint8 0..255 -> [0, 1] -> (x - 0.5) / 0.5 in [-1, 1]
    full = Split(torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1), torch.tensor([0, 1]))
    xb, _ = next(iter(TensorLoader(full, 2)))
    assert xb.flatten().tolist() == [-1.0, 1.0]
    xb, _ = next(iter(TensorLoader(full, 2, mean=0.0, std=1.0)))
    assert xb.flatten().tolist() == [0.0, 1.0]
    drop = TensorLoader(split, 16, drop_last=True)
    assert len(drop) == 3 == len(list(drop))


def test_loader_shuffle_covers_every_sample_once_and_is_seeded():
    split = _ids_split(50)
    a = TensorLoader(split, 8, shuffle=True, seed=7)
    b = TensorLoader(split, 8, shuffle=True, seed=7)
    c = TensorLoader(split, 8, shuffle=True, seed=8)
    epochs_a = []
    for _ in range(3):
        ids = torch.cat([_ids_of(x) for x, _ in a])
        assert sorted(ids.tolist()) == list(range(50))
        epochs_a.append(ids)
    assert not torch.equal(epochs_a[0], epochs_a[1])  # a fresh order each epoch
    assert not torch.equal(epochs_a[0], torch.arange(50))
    epochs_b = [torch.cat([_ids_of(x) for x, _ in b]) for _ in range(3)]
    assert all(torch.equal(p, q) for p, q in zip(epochs_a, epochs_b))
    assert not torch.equal(torch.cat([_ids_of(x) for x, _ in c]), epochs_a[0])
    # labels travel with their images
    for x, y in TensorLoader(split, 8, shuffle=True, seed=1):
        assert torch.equal(y, split.labels[_ids_of(x)])


def test_loader_state_dict_restores_order():
    split = _ids_split(40)
    a = TensorLoader(split, 8, shuffle=True, seed=3)
    list(a)
    state = a.state_dict()
    nxt = torch.cat([_ids_of(x) for x, _ in a])
    b = TensorLoader(split, 8, shuffle=True, seed=99)
    b.load_state_dict(state)
    assert b.epoch == 1
    assert torch.equal(torch.cat([_ids_of(x) for x, _ in b]), nxt)


def test_loader_weighted_sampling_favours_rare_class():
    labels = torch.tensor([0] * 90 + [1] * 10)
    split = Split(torch.zeros(100, 1, 2, 2, dtype=torch.uint8), labels)
    w = data.class_balanced_weights(labels, 2)
    assert torch.allclose(w[:90], torch.full((90,), 1 / 90)) and torch.allclose(w[90:], torch.full((10,), 0.1))
    loader = TensorLoader(split, 100, weights=w, num_samples=2000, seed=0)
    assert len(loader) == 20
    ys = torch.cat([y for _, y in loader])
    assert len(ys) == 2000
    share = ys.float().mean().item()
    assert 0.4 < share < 0.6  # balanced, versus 0.1 without weights


def test_class_weights_balanced():
    labels = torch.tensor([0, 0, 0, 1])
    assert torch.allclose(data.class_weights(labels, 2), torch.tensor([4 / 6, 4 / 2]))
    # a class absent from the labels does not divide by zero
    assert torch.isfinite(data.class_weights(labels, 3)).all()


@pytest.mark.parametrize("shuffle", [False, True])
def test_loader_rank_sharding_is_disjoint(shuffle):
    split = _ids_split(50)
    world = 3
    seen = []
    lengths = []
    for rank in range(world):
        loader = TensorLoader(split, 4, shuffle=shuffle, seed=5, rank=rank, world_size=world)
        ids = torch.cat([_ids_of(x) for x, _ in loader])
        lengths.append(len(loader))
        seen.append(set(ids.tolist()))
        assert len(ids) == 50 // world
    for i in range(world):
        for j in range(i + 1, world):
            assert not seen[i] & seen[j]
    assert len(set().union(*seen)) == 3 * (50 // world)
    assert lengths == [-(-(50 // world) // 4)] * world


def test_loader_applies_augment_with_its_generator():
    split = _ids_split(8)
    calls = []

    def aug(x, gen):
        calls.append(gen)
        assert x.min() >= 0 and x.max() <= 1  # augment sees [0, 1] floats, before normalising
        return 1.0 - x

    loader = TensorLoader(split, 8, augment=aug)
    x, _ = next(iter(loader))
    assert calls == [loader.generator]
    expect = ((1 - torch.arange(8) / 255.0) - 0.5) / 0.5
    assert torch.allclose(x[:, 0, 0, 0], expect)


# ---- k-fold -------------------------------------------------------------------------------------
def test_kfold_written_reused_and_stratified(tmp_path):
    labels = np.array([0] * 60 + [1] * 30 + [2] * 15)
    path = tmp_path / "folds" / "f.json"
    folds = data.kfold(labels, 5, seed=1, path=path)
    assert path.is_file()
    saved = json.loads(path.read_text())
    assert saved["k"] == 5 and saved["seed"] == 1 and saved["n"] == len(labels)
    assert len(folds) == 5
    vals = [v for _, v in folds]
    allv = np.concatenate(vals)
    assert sorted(allv.tolist()) == list(range(len(labels)))  # disjoint, cover everything
    for tr, va in folds:
        assert not set(tr) & set(va)
        assert len(tr) + len(va) == len(labels)
        assert np.bincount(labels[va], minlength=3).tolist() == [12, 6, 3]
    mtime = path.stat().st_mtime_ns
    again = data.kfold(labels, 5, seed=1, path=path)
    assert path.stat().st_mtime_ns == mtime  # reused, not rewritten
    for (t1, v1), (t2, v2) in zip(folds, again):
        assert np.array_equal(t1, t2) and np.array_equal(v1, v2)
    # a fresh file with another seed differs
    other = data.kfold(labels, 5, seed=2, path=tmp_path / "g.json")
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(folds, other))


def test_kfold_refuses_changed_inputs(tmp_path):
    labels = np.array([0, 1] * 20)
    path = tmp_path / "f.json"
    data.kfold(labels, 4, seed=0, path=path)
    for kw in ({"labels": labels[::-1].copy(), "k": 4, "seed": 0},
               {"labels": labels, "k": 5, "seed": 0},
               {"labels": labels, "k": 4, "seed": 1}):
        with pytest.raises(DataError, match=re.escape(str(path))):
            data.kfold(kw["labels"], kw["k"], kw["seed"], path)


def test_kfold_multilabel_uses_argmax(tmp_path):
    y = np.zeros((36, 3), dtype=np.float32)
    y[np.arange(36), np.arange(36) % 3] = 1
    folds = data.kfold(torch.from_numpy(y), 3, seed=0, path=tmp_path / "m.json")
    for _, va in folds:
        assert np.bincount(y[va].argmax(1), minlength=3).tolist() == [4, 4, 4]


def test_labels_outside_the_flags_classes_are_refused_at_load(tmp_path, make_npz):
    path = make_npz(tmp_path, "pneumoniamnist", n=(10, 4, 4))
    arrays = dict(np.load(path))
    arrays["val_labels"][1, 0] = 7  # a 7 in a binary task
    np.savez_compressed(path, **arrays)
    with pytest.raises(data.DataError, match=r"pneumoniamnist.npz \(val split\).*\[7\].*2 classes.*Fix"):
        data.load("pneumoniamnist", root=tmp_path, verify=False, download=False)


def test_multilabel_labels_must_be_binary_columns(tmp_path, make_npz):
    path = make_npz(tmp_path, "chestmnist", n=(10, 4, 4))
    arrays = dict(np.load(path))
    arrays["train_labels"][0, 0] = 2
    np.savez_compressed(path, **arrays)
    with pytest.raises(data.DataError, match="0/1 with 14 columns"):
        data.load("chestmnist", root=tmp_path, verify=False, download=False)


def test_a_data_root_that_is_a_file_is_named(tmp_path):
    root = tmp_path / "medmnist"
    root.write_text("not a folder")
    with pytest.raises(data.DataError, match=r"data root .*medmnist is a file, not a folder.*Fix"):
        data.load("breastmnist", root=root, download=True)
