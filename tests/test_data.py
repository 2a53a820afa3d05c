"""Dataset loaders on generated fake layouts, K-shot sampling, grouping, templates, transforms and the errors
a user sees for missing or broken data."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tailclip.config import DataConfig
from tailclip.data import (
    LabeledImages,
    apply_shots,
    build_task,
    collate_skip_none,
    get_templates,
    list_datasets,
    many_medium_few,
    sample_k_shot,
    verify_dataset,
)
from tailclip.data.base import FileImages
from tailclip.data.cifar import lt_profile, select_lt
from tailclip.data.common import imagenet_classes
from tailclip.data.imagenet import subset_wnids
from tailclip.data.templates import TEMPLATE_SETS
from tailclip.errors import CorruptImageError, DataError, UnknownNameError


def png(path: Path, color: tuple[int, int, int] = (10, 20, 30), size: int = 6) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)


def cfg(name: str, root: Path | str | None, **kw) -> DataConfig:
    return DataConfig(name=name, root=None if root is None else str(root), **kw)


# --------------------------------------------------------------------------- registry, templates, groups


def test_registry_lists_every_dataset_with_a_description() -> None:
    entries = dict(list_datasets())
    expected = {
        "cifar100", "cifar100-lt", "imagenet-lt", "places-lt", "inat2018", "imagenet", "caltech101", "oxford_pets",
        "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101",
        "imagenet-v2", "imagenet-sketch", "imagenet-a", "imagenet-r", "image-folder", "csv",
    }  # fmt: skip
    assert expected <= set(entries)
    assert all(entries[n] for n in expected)


def test_unknown_dataset_lists_known_names() -> None:
    with pytest.raises(UnknownNameError) as exc:
        build_task(cfg("no-such-set", None))
    assert "no-such-set" in str(exc.value) and "cifar100-lt" in str(exc.value) and "oxford_pets" in str(exc.value)


def test_template_sets(tmp_path: Path) -> None:
    assert len(get_templates("imagenet80")) == 80 and len(get_templates("imagenet7")) == 7
    sage = get_templates("sage60")
    assert len(sage) == len(set(sage)) == 60 and sage[0] == "a photo of a {}." and sage[-1] == "itap of the {}."
    assert get_templates("coop_oxford_pets") == ["a photo of a {}, a type of pet."]
    assert get_templates("photo") == ["a photo of a {}."]
    assert all(t.count("{}") == 1 for ts in TEMPLATE_SETS.values() for t in ts)
    f = tmp_path / "mine.txt"
    f.write_text("# mine\na {} on a table.\n\na drawing of {}.\n")
    assert get_templates(str(f)) == ["a {} on a table.", "a drawing of {}."]
    with pytest.raises(UnknownNameError, match="imagenet80"):
        get_templates("nope")


def test_many_medium_few() -> None:
    assert many_medium_few([101, 100, 20, 19, 0]).tolist() == [0, 1, 1, 2, 2]
    groups = many_medium_few(lt_profile(500, 100, 100))
    assert np.bincount(groups).tolist() == [35, 35, 30]


# --------------------------------------------------------------------------- CIFAR-100(-LT)


@pytest.mark.parametrize(("beta", "total"), [(100, 10847), (50, 12608), (10, 19573)])
def test_cifar_lt_counts(beta: int, total: int) -> None:
    labels = np.repeat(np.arange(100), 500)
    train, val, overlap = select_lt(labels, beta, seed=1)
    counts = np.bincount(labels[train], minlength=100)
    assert counts.sum() == total and counts.tolist() == lt_profile(500, 100, beta).tolist()
    assert counts[0] == 500 and counts[-1] == int(500 / beta)
    assert np.bincount(labels[val], minlength=100).tolist() == [10] * 100
    assert overlap == [0]  # only the head class keeps all its images
    shared = set(train) & set(val)
    assert shared and all(labels[i] == 0 for i in shared)
    again, _, _ = select_lt(labels, beta, seed=1)
    other, _, _ = select_lt(labels, beta, seed=2)
    assert np.array_equal(train, again) and not np.array_equal(train, other)


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fake torchvision CIFAR-100 pickles: 12 train / 2 test images per class (pixel value encodes class)."""
    root = tmp_path_factory.mktemp("cifar")
    d = root / "cifar-100-python"
    d.mkdir()
    names = [f"class_{i:02d}" for i in range(100)]
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names, "coarse_label_names": ["c"] * 20}, f)
    for part, per_class in (("train", 12), ("test", 2)):
        labels = np.repeat(np.arange(100), per_class)
        data = np.zeros((len(labels), 3, 32, 32), dtype=np.uint8)
        data[:, 0] = labels[:, None, None]  # red = class id, green = 7, blue = 0
        data[:, 1] = 7
        with open(d / part, "wb") as f:
            pickle.dump({"data": data.reshape(len(labels), -1), "fine_labels": labels.tolist()}, f)
    return root


def test_cifar100_balanced(cifar_root: Path) -> None:
    task = build_task(cfg("cifar100", cifar_root))
    assert task.num_classes == 100 and task.classnames[3] == "class 03"
    assert len(task.split("train")) == 1200 and len(task.split("test")) == 200 and "val" not in task.splits
    assert len(task.templates) == 80
    img = task.split("test").images.load(5)
    assert img.size == (32, 32) and img.mode == "RGB" and img.getpixel((0, 0)) == (2, 7, 0)


def test_cifar100_lt_task(cifar_root: Path) -> None:
    task = build_task(cfg("cifar100-lt-seeded", cifar_root, imbalance_ratio=10, seed=3, templates="sage60"))
    expected = lt_profile(12, 100, 10)
    assert task.class_counts.tolist() == expected.tolist()
    assert task.meta["imbalance_ratio"] == 10 and task.meta["lt_seed"] == 3
    assert task.group_counts is not None and task.group_counts.tolist() == lt_profile(12, 100, 100).tolist()
    assert len(task.templates) == 60
    train = task.split("train")
    for i in range(0, len(train), 97):  # labels agree with the pixels
        assert train.images.load(i).getpixel((0, 0))[0] == train.labels[i]
    default = build_task(cfg("cifar100-lt", cifar_root))
    assert default.meta["imbalance_ratio"] == 100


def test_cifar_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.root"):
        build_task(cfg("cifar100-lt", None))
    with pytest.raises(DataError, match="does not exist"):
        build_task(cfg("cifar100-lt", tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"cifar-100-python.*cifar-100-python\.tar\.gz"):
        build_task(cfg("cifar100-lt", tmp_path))


# --------------------------------------------------------------------------- ImageNet-LT / Places-LT / iNat


def write_list(path: Path, rows: list[tuple[str, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{p} {y}\n" for p, y in rows))


def test_imagenet_lt_fake_layout(tmp_path: Path) -> None:
    rows = {s: [(f"{s}/n{y:08d}/{s}_{i}.JPEG", y) for y in (0, 1, 999) for i in range(2)] for s in ("train", "val")}
    for split_rows in rows.values():
        for p, _ in split_rows:
            png(tmp_path / p)
    write_list(tmp_path / "ImageNet_LT" / "ImageNet_LT_train.txt", rows["train"])  # split-files dir at root
    write_list(tmp_path / "ImageNet_LT" / "ImageNet_LT_test.txt", rows["val"])
    task = build_task(cfg("imagenet-lt", tmp_path))
    assert task.num_classes == 1000 and task.classnames[0] == "tench" and "val" not in task.splits
    assert len(task.split("train")) == 6 and task.class_counts[999] == 2 and len(task.templates) == 80
    assert task.split("test").images.load(0).size == (6, 6)
    write_list(tmp_path / "ImageNet_LT_val.txt", rows["val"])  # lists directly in root work too
    assert len(build_task(cfg("imagenet-lt", tmp_path)).split("val")) == 6


def test_lt_missing_list_and_bad_labels(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        build_task(cfg("places-lt", tmp_path))
    assert "Places_LT_train.txt" in str(exc.value) and "OpenLongTailRecognition" in str(exc.value)
    write_list(tmp_path / "Places_LT_train.txt", [("train/a/1.jpg", 0), ("train/b/1.jpg", 365)])
    write_list(tmp_path / "Places_LT_test.txt", [("val/a/1.jpg", 0)])
    with pytest.raises(DataError, match=r"labels span \[0, 365\].*365 class names"):
        build_task(cfg("places-lt", tmp_path))
    (tmp_path / "Places_LT_test.txt").write_text("no-label-here\n")
    with pytest.raises(DataError, match=r"Places_LT_test.txt:1"):
        build_task(cfg("places-lt", tmp_path))


def test_inat_val_list_is_test(tmp_path: Path) -> None:
    write_list(
        tmp_path / "iNaturalist18_train.txt", [("train_val2018/A/0/x.jpg", 0), ("train_val2018/A/9/y.jpg", 8141)]
    )
    write_list(tmp_path / "iNaturalist18_val.txt", [("train_val2018/A/0/z.jpg", 0)])
    task = build_task(cfg("inat2018", tmp_path))
    assert task.num_classes == 8142 and set(task.splits) == {"train", "test"}
    assert task.classnames[0] == "Hermodice carunculata"


# --------------------------------------------------------------------------- CoOp few-shot datasets


def write_coop_split(path: Path, image_root: Path, per_split: dict[str, int], classes: list[str]) -> None:
    data = {}
    for split, n in per_split.items():
        rows = []
        for y, c in enumerate(classes):
            for i in range(n):
                rel = f"{c}/{split}_{i}.jpg"
                png(image_root / rel)
                rows.append([rel, y, c])
        data[split] = rows
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_coop_pets_from_data_root(tmp_path: Path) -> None:
    d = tmp_path / "oxford_pets"  # root may be CoOp's $DATA folder
    write_coop_split(d / "split_zhou_OxfordPets.json", d / "images", {"train": 6, "val": 5, "test": 2},
                     ["abyssinian", "american_bulldog", "beagle"])  # fmt: skip
    task = build_task(cfg("oxford_pets", tmp_path))
    assert task.classnames == ["abyssinian", "american bulldog", "beagle"]
    assert task.templates == ["a photo of a {}, a type of pet."]
    assert [len(task.split(s)) for s in ("train", "val", "test")] == [18, 15, 6]
    assert task.split("train").images.load(0).mode == "RGB"
    assert build_task(cfg("oxford_pets", d)).split("test").fingerprint() == task.split("test").fingerprint()

    few = build_task(cfg("oxford_pets", d, shots=4, seed=2))
    assert few.class_counts.tolist() == [4, 4, 4] and np.bincount(few.split("val").labels).tolist() == [4, 4, 4]
    assert len(few.split("test")) == 6 and few.meta["shots"] == 4 and set(few.meta["shot_indices"]) == {"train", "val"}
    one = build_task(cfg("oxford_pets", d, shots=1, seed=2))
    assert np.bincount(one.split("val").labels).tolist() == [1, 1, 1]


def test_coop_renames_and_split_file_errors(tmp_path: Path) -> None:
    write_coop_split(tmp_path / "split_zhou_EuroSAT.json", tmp_path / "2750", {"train": 1, "test": 1},
                     ["AnnualCrop", "Highway or Road"])  # fmt: skip
    task = build_task(cfg("eurosat", tmp_path))
    assert task.classnames == ["Annual Crop Land", "Highway or Road"]  # old names mapped, new ones kept
    assert task.templates == ["a centered satellite photo of {}."]
    with pytest.raises(DataError) as exc:
        build_task(cfg("dtd", tmp_path))
    msg = str(exc.value)
    assert "split_zhou_DescribableTextures.json" in msg and "CoOp" in msg and str(tmp_path) in msg
    bad = {"train": [["a.jpg", 0, "x"], ["b.jpg", 0, "y"]], "test": []}
    (tmp_path / "split_zhou_DescribableTextures.json").write_text(json.dumps(bad))
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="named both"):
        build_task(cfg("dtd", tmp_path))


def test_fgvc_aircraft(tmp_path: Path) -> None:
    d = tmp_path / "fgvc_aircraft"
    d.mkdir()
    (d / "variants.txt").write_text("707-320\nA300B4\nCessna 172\n")
    for split in ("train", "val", "test"):
        lines = [f"{i:07d} {v}" for i, v in enumerate(["707-320", "Cessna 172", "A300B4", "Cessna 172"])]
        (d / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    png(d / "images" / "0000000.jpg")
    task = build_task(cfg("fgvc_aircraft", tmp_path))
    assert task.classnames == ["707-320", "A300B4", "Cessna 172"]
    assert task.split("train").labels.tolist() == [0, 2, 1, 2]
    assert task.split("test").images.ident(1).endswith("images/0000001.jpg")
    assert task.templates == ["a photo of a {}, a type of aircraft."]


# --------------------------------------------------------------------------- ImageNet and shifts


def test_imagenet_and_variants(tmp_path: Path) -> None:
    wnids, names = imagenet_classes()
    assert len(wnids) == 1000 and names[0] == "tench"
    base = tmp_path / "imagenet" / "images"
    for split in ("train", "val"):
        for w in wnids:
            (base / split / w).mkdir(parents=True)
    png(base / "train" / wnids[0] / "a.JPEG")
    png(base / "train" / wnids[5] / "b.JPEG")
    png(base / "val" / wnids[5] / "c.JPEG")
    task = build_task(cfg("imagenet", tmp_path / "imagenet"))
    assert list(task.splits) == ["train", "test"]  # the official val images are the test split, never a val
    assert task.class_counts[[0, 5]].tolist() == [1, 1] and task.split("test").labels.tolist() == [5]

    a_wnids = subset_wnids("imagenet_a")
    assert len(a_wnids) == len(set(a_wnids)) == 200 and len(subset_wnids("imagenet_r")) == 200
    a_root = tmp_path / "imagenet-adversarial"
    for w in a_wnids:
        (a_root / "imagenet-a" / w).mkdir(parents=True)
    png(a_root / "imagenet-a" / a_wnids[3] / "x.jpg")
    a = build_task(cfg("imagenet-a", a_root))
    idx = a.meta["imagenet_class_indices"]
    assert a.num_classes == 200 and list(a.splits) == ["test"] and a.split("test").labels.tolist() == [3]
    assert [wnids[i] for i in idx] == a_wnids and a.classnames[3] == names[idx[3]]
    with pytest.raises(DataError, match="no class folders"):
        build_task(cfg("imagenet-r", a_root))
    (a_root / "imagenet-a" / a_wnids[0]).rmdir()
    with pytest.raises(DataError, match="1 class folder"):
        build_task(cfg("imagenet-a", a_root))

    v2 = tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    png(v2 / "7" / "q.jpeg")
    png(v2 / "999" / "r.jpeg")
    assert build_task(cfg("imagenet-v2", v2.parent)).split("test").labels.tolist() == [7, 999]


# --------------------------------------------------------------------------- user datasets


def test_image_folder_layouts(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    for c in ("cat", "dog"):
        for i in range(10):
            png(flat / c / f"{i}.png")
    task = build_task(cfg("image-folder", flat))
    assert task.classnames == ["cat", "dog"] and task.templates == ["a photo of a {}."]
    assert [len(task.split(s)) for s in ("train", "val", "test")] == [14, 2, 4]
    again = build_task(cfg("image-folder", flat, seed=9))  # the hold-out does not move with data.seed
    assert again.split("test").fingerprint() == task.split("test").fingerprint()

    split = tmp_path / "split"
    png(split / "train" / "cat" / "1.png")
    png(split / "train" / "dog" / "1.png")
    png(split / "test" / "emu" / "1.jpg")
    task = build_task(cfg("image-folder", split))
    assert task.classnames == ["cat", "dog", "emu"] and set(task.splits) == {"train", "test"}
    assert task.split("test").labels.tolist() == [2]
    with pytest.raises(DataError, match="no images"):
        (tmp_path / "empty").mkdir()
        build_task(cfg("image-folder", tmp_path / "empty"))


def test_csv_dataset(tmp_path: Path) -> None:
    png(tmp_path / "img" / "a.png")
    png(tmp_path / "img" / "b.png")
    f = tmp_path / "data.csv"
    f.write_text("path,label,split\nimg/a.png,zebra,train\nimg/b.png,ant,test\n")
    task = build_task(cfg("csv", f))
    assert task.classnames == ["ant", "zebra"] and task.split("train").labels.tolist() == [1]
    assert task.split("test").images.load(0).size == (6, 6)

    g = tmp_path / "ints.csv"
    g.write_text("path,label\n" + "".join(f"img/a.png,{i % 3}\n" for i in range(12)))
    (tmp_path / "classnames.txt").write_text("ant\nbee\n")
    with pytest.raises(DataError, match=r"labels span \[0, 2\]"):
        build_task(cfg("csv", g))
    (tmp_path / "classnames.txt").write_text("ant\nbee\ncow\n")
    task = build_task(cfg("csv", g))
    assert task.classnames == ["ant", "bee", "cow"] and sum(len(s) for s in task.splits.values()) == 12

    f.write_text("path,label,split\nimg/a.png,zebra,training\n")
    with pytest.raises(DataError, match=r"data.csv:2: split 'training'"):
        build_task(cfg("csv", f))


# --------------------------------------------------------------------------- K-shot sampling


def test_sample_k_shot_reproducible(caplog: pytest.LogCaptureFixture) -> None:
    labels = np.repeat(np.arange(5), 30)
    a = sample_k_shot(labels, 4, seed=1)
    assert np.array_equal(a, sample_k_shot(labels, 4, seed=1)) and np.array_equal(a, np.sort(a))
    assert np.bincount(labels[a]).tolist() == [4] * 5
    assert not np.array_equal(a, sample_k_shot(labels, 4, seed=2))
    # fixed values: a change of generator or algorithm would silently change every published few-shot split
    assert sample_k_shot(np.zeros(10, dtype=int), 3, seed=1).tolist() == [4, 5, 7]
    short = np.array([0, 0, 0, 1])
    with caplog.at_level(logging.WARNING):
        assert sample_k_shot(short, 2, seed=1).tolist().count(3) == 1
    assert "fewer than 2" in caplog.text
    with pytest.raises(DataError, match="fewer than 2"):
        sample_k_shot(short, 2, seed=1, strict=True)


def test_apply_shots_reapplies_stored_indices(tmp_path: Path) -> None:
    write_coop_split(tmp_path / "split_zhou_DescribableTextures.json", tmp_path / "images",
                     {"train": 8, "val": 6, "test": 1}, ["banded", "dotted"])  # fmt: skip
    full = build_task(cfg("dtd", tmp_path))
    few = apply_shots(full, cfg("dtd", tmp_path, shots=2, seed=5))
    stored = json.loads(json.dumps(few.meta["shot_indices"]))  # as a run folder would keep them
    again = apply_shots(full, cfg("dtd", tmp_path, shots=2, seed=99), indices=stored)
    for s in ("train", "val"):
        assert again.split(s).fingerprint() == few.split(s).fingerprint()
    with pytest.raises(DataError, match="outside"):
        apply_shots(full, cfg("dtd", tmp_path), indices={"train": [0, 10_000]})


# --------------------------------------------------------------------------- bad images, verify-data


def test_corrupt_and_missing_images(tmp_path: Path) -> None:
    png(tmp_path / "train" / "cat" / "good.png")
    (tmp_path / "train" / "cat" / "bad.png").write_bytes(b"\x89PNG garbage, not an image")
    png(tmp_path / "test" / "cat" / "ok.png")
    c = cfg("image-folder", tmp_path)
    task = build_task(c)
    src = task.split("train").images
    bad_index = [src.ident(i) for i in range(len(src))].index(str(tmp_path / "train" / "cat" / "bad.png"))
    with pytest.raises(CorruptImageError) as exc:
        src.load(bad_index)
    assert exc.value.path.endswith("bad.png") and "bad.png" in str(exc.value)

    ds = LabeledImages(task.split("train"), lambda im: torch.zeros(1), on_bad_image="skip")
    batch = collate_skip_none([ds[i] for i in range(len(ds))])
    assert batch[0].shape[0] == 1 and ds.bad == [str(tmp_path / "train" / "cat" / "bad.png")]
    with pytest.raises(CorruptImageError):
        LabeledImages(task.split("train"), lambda im: im)[bad_index]

    (tmp_path / "test" / "cat" / "ok.png").unlink()
    problems = verify_dataset(c)
    assert any("bad.png" in p and p.startswith("train: unreadable") for p in problems)
    with pytest.raises(DataError, match="missing image file"):
        FileImages(str(tmp_path), ["test/cat/ok.png"]).load(0)
    f = tmp_path / "list.csv"
    f.write_text("path,label,split\ntrain/cat/good.png,cat,train\ngone.png,cat,test\n")
    lines = verify_dataset(cfg("csv", f))
    assert lines == [f"test: missing: {tmp_path / 'gone.png'}"]
    assert verify_dataset(cfg("csv", tmp_path / "none.csv"))[0].startswith("dataset 'csv': root")


# --------------------------------------------------------------------------- base-to-new


def test_base_to_new(tmp_path: Path) -> None:
    from tailclip.data.base2new import b2n_lt_counts

    classes = ["a_cls", "b_cls", "c_cls", "d_cls", "e_cls"]
    write_coop_split(tmp_path / "split_zhou_OxfordPets.json", tmp_path / "images",
                     {"train": 5, "val": 5, "test": 2}, classes)  # fmt: skip
    task = build_task(cfg("oxford_pets-b2n", tmp_path, shots=2))
    assert task.num_classes == 5 and task.meta["base_classes"] == [0, 1, 2] and task.meta["new_classes"] == [3, 4]
    assert task.class_counts.tolist() == [2, 2, 2, 0, 0] and np.bincount(task.split("val").labels).tolist() == [2] * 3
    assert len(task.split("test")) == 10 and set(task.split("test_new").labels) == {3, 4}
    assert task.meta["label_spaces"]["test_base"] == [0, 1, 2]
    lt = build_task(cfg("oxford_pets-b2n-lt", tmp_path, imbalance_ratio=4))
    assert lt.class_counts.tolist() == [5, 2, 1, 0, 0]  # n_max = the largest class after the 100 cap: 5, 5/2, 5/4
    # ranked by capped count, ties in list order; n_max = 30: 30, int(30 * 0.1^0.5), int(30 * 0.1)
    assert b2n_lt_counts(np.array([10, 30, 30]), 10).tolist() == [3, 30, 9]
