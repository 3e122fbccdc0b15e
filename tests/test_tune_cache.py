"""The convolution choices kept between processes (hetnet.backends.cuda.tune_cache), without a GPU: the file's
name, what it keeps, what it ignores. tests/test_cuda.py checks that a fresh CUDA backend takes its choices from it."""
from __future__ import annotations

import json

from hetnet.backends.cuda import tune_cache as TC


class FakeCupy:
    __version__ = "14.2.0"

    class cuda:
        class runtime:
            @staticmethod
            def runtimeGetVersion():
                return 13000

            @staticmethod
            def driverGetVersion():
                return 13000


class FakeBackend:
    cupy, gpu_name, precision = FakeCupy, "NVIDIA H200", "bf16"


def test_choices_are_kept_in_one_file_per_card_precision_and_kernels(tmp_path, monkeypatch):
    monkeypatch.setenv("HETNET_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HETNET_TUNE_CACHE", "1")
    be = FakeBackend()
    tf = TC.for_backend(be)
    assert TC.for_backend(be) is tf                         # opened once per backend
    key = ("fwd", (512, 64, 32, 32, 128, 3, 3, 1, 1))
    tf.put(key, "tc", {"tc": 0.5, "implicit": 0.75})
    assert tf.path.parent == tmp_path / "tune" and tf.path.name.startswith("NVIDIA-H200-bf16-")
    again = TC.TuneFile(tf.path)
    assert again.get(key) == "tc" and again.times(key) == {"tc": 0.5, "implicit": 0.75}
    assert again.get(("data", key[1])) is None and again.times(("data", key[1])) == {}
    doc = json.loads(tf.path.read_text())
    assert doc == {"format": TC.FORMAT, "choices": [["fwd", list(key[1]), "tc", {"tc": 0.5, "implicit": 0.75}]]}
    # another precision, other versions or other kernel sources: another file
    assert TC.path_for("NVIDIA H200", "tf32") != TC.path_for("NVIDIA H200", "bf16")
    assert TC.path_for("NVIDIA H200", "bf16", "cupy 14") != TC.path_for("NVIDIA H200", "bf16", "cupy 13")
    every_kernel = TC.digest()
    monkeypatch.setattr(TC, "_SOURCES", ("conv_tiles.py",))
    assert TC.digest() != every_kernel


def test_an_unreadable_or_foreign_file_is_ignored_and_rewritten(tmp_path):
    path = tmp_path / "t.json"
    key = ("filter", (1, 2, 3, 4, 5, 3, 3, 1, 1))
    for text in ("{not json", '{"format": "other", "choices": [["fwd", [1], "x", {}]]}', '{"format": "hetnet-tune-2"}',
                 '[1, 2]', '{"format": "hetnet-tune-2", "choices": [["fwd", "abc", "x", {}]]}',
                 '{"format": "hetnet-tune-2", "choices": [["fwd", [1], "x"]]}',
                 '{"format": "hetnet-tune-2", "choices": [["fwd", [1], "x", {"a": "slow"}]]}'):
        path.write_text(text)
        tf = TC.TuneFile(path)
        assert tf.choices == {}, text
        tf.put(key, "implicit")
        assert TC.TuneFile(path).get(key) == "implicit"


def test_off_when_asked_and_quiet_when_unwritable(tmp_path, monkeypatch):
    monkeypatch.setenv("HETNET_TUNE_CACHE", "0")
    assert not TC.enabled() and TC.for_backend(FakeBackend()) is None
    blocker = tmp_path / "file"
    blocker.write_text("")
    tf = TC.TuneFile(blocker / "tune" / "x.json")            # its folder cannot be made
    tf.put(("fwd", (1,)), "tc")                             # no error: the next process measures again
    assert tf.get(("fwd", (1,))) == "tc"


def test_a_choice_stands_only_against_the_candidates_it_was_measured_with(tmp_path):
    """A remembered choice is used where the call offers it and every candidate of the call was measured with it;
    a kernel added since makes it measured again, except inside a graph capture, where nothing can be."""
    tf = TC.TuneFile(tmp_path / "t.json")
    key = ("data", (512, 128, 16, 16, 128, 3, 3, 1, 1))
    tf.put(key, "tc16w128x256s4", {"tc16w128x256s4": 0.11, "tc16": 0.2})
    assert tf.standing(key, {"tc16w128x256s4": 0, "tc16": 0}, capturing=False) == "tc16w128x256s4"
    assert tf.standing(key, {"tc16w128x256s4": 0}, capturing=False) == "tc16w128x256s4"
    added = {"tc16w128x256s4": 0, "tc16": 0, "tc16w128x256s4t": 0}
    assert tf.standing(key, added, capturing=False) is None
    assert tf.standing(key, added, capturing=True) == "tc16w128x256s4"
    assert tf.standing(key, {"tc16": 0}, capturing=True) is None               # not offered
    assert tf.standing(("fwd", key[1]), added, capturing=True) is None         # never measured
