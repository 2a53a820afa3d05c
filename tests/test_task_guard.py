"""Methods are built from a TaskInfo (no images) and fitted on a task whose test splits cannot be read."""

from __future__ import annotations

import numpy as np
import pytest

from tailclip.data.base import ArrayImages, Split, Task, TaskInfo, TestSplitAccessError


def _task() -> Task:
    images = ArrayImages(np.zeros((10, 4, 4, 3), np.uint8), "toy")
    labels = np.array([0, 0, 0, 1, 1, 2, 0, 1, 2, 2])
    full = Split(images, labels)
    return Task("toy", ["a", "b", "c"], ["a photo of a {}."],
                {"train": full.subset(range(6)), "val": full.subset([6, 7]), "test": full.subset([8, 9])},
                meta={"shots": None, "base_classes": [0, 1], "new_classes": [2]})


def test_info_carries_counts_and_partition_but_no_images() -> None:
    info = _task().info()
    assert isinstance(info, TaskInfo)
    assert info.class_counts.tolist() == [3, 2, 1] and info.num_train == 6 and info.num_classes == 3
    assert info.split_names == ("train", "val", "test")
    assert info.base_classes == [0, 1] and info.new_classes == [2]
    assert not any(isinstance(v, Split) for v in vars(info).values())


def test_guarded_task_refuses_test_reads_only() -> None:
    task = _task().guarded()
    assert "test" in task.splits and len(task.split("train")) == 6 and len(task.splits["val"]) == 2
    with pytest.raises(TestSplitAccessError, match="'test' split was read during fit"):
        task.split("test")
    with pytest.raises(TestSplitAccessError):
        dict(task.splits.items())
    assert task.splits.get("missing") is None
    assert len(task.unguarded().split("test")) == 2  # a named paper protocol asks on purpose
    assert len(task.split("val")) == 2  # the guarded view itself is unchanged
