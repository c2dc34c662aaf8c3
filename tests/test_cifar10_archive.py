"""CIFAR-10 from the official archive, without TensorFlow (`scripts/prepare_data.py --dataset CIFAR10 --source`).

Small synthetic archives in exactly the official layouts (cifar-10-python.tar.gz: pickled batches as
Python 2 wrote them; cifar-10-binary.tar.gz: 1 label byte + 3072 channel-major pixel bytes per record) are
built from fresh random pixels, prepared into a temporary tfds data dir with a test-only example count, and
read back with the stock `tfds.data_source('cifar10', ...)`: every pixel, label and id, in tfds' own record
order; both archive versions give identical datasets; bad input gives a one-line `ERROR:` and status 2,
and leaves nothing in the data dir.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import pathlib
import pickle
import re
import struct
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import hashing

from score_sde_jax.datasets import cifar10

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "prepare_data.py")
PER_BATCH = 3  # images per training batch file (the official archives have 10000)
COUNTS = {"train": 5 * PER_BATCH, "test": 4}


def _load_script():
  spec = importlib.util.spec_from_file_location("prepare_data_script", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def script():
  return _load_script()


@pytest.fixture(scope="module")
def cifar():
  """Fresh random images (no zero pixels) and labels, split -> (uint8 [N, 32, 32, 3], uint8 [N])."""
  rng = np.random.default_rng()
  return {split: (rng.integers(1, 256, size=(n, 32, 32, 3), dtype=np.uint8),
                  rng.integers(0, 10, size=n, dtype=np.uint8)) for split, n in COUNTS.items()}


def _rows(images):
  """[N, 32, 32, 3] -> [N, 3072]: the R, G and B planes of each image, one after another."""
  return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def _batches(cifar):
  """[(batch name, images, labels)]: data_batch_1..5 (the training split in order), test_batch."""
  (train_x, train_y), (test_x, test_y) = cifar["train"], cifar["test"]
  out = [(f"data_batch_{i + 1}", train_x[i * PER_BATCH:(i + 1) * PER_BATCH],
          train_y[i * PER_BATCH:(i + 1) * PER_BATCH]) for i in range(5)]
  return out + [("test_batch", test_x, test_y)]


def _py2_pickle(obj) -> bytes:
  """`obj` pickled as Python 2's cPickle (protocol 2) wrote the official batches: str as BINSTRING, the
  numpy array through numpy.core.multiarray._reconstruct with its raw bytes as a BINSTRING state."""
  out = bytearray(b"\x80\x02")

  def put(x):
    if isinstance(x, dict):
      out.extend(b"}(")
      for k, v in x.items():
        put(k)
        put(v)
      out.extend(b"u")
    elif isinstance(x, list):
      out.extend(b"](")
      for v in x:
        put(v)
      out.extend(b"e")
    elif isinstance(x, bytes):
      out.extend(b"U" + bytes([len(x)]) + x if len(x) < 256 else b"T" + struct.pack("<I", len(x)) + x)
    elif isinstance(x, int):
      out.extend(b"K" + bytes([x]) if 0 <= x < 256 else b"J" + struct.pack("<i", x))
    elif isinstance(x, np.ndarray):
      assert x.dtype == np.uint8 and x.ndim == 2
      out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R(K\x01")
      out.extend(b"J" + struct.pack("<i", x.shape[0]) + b"J" + struct.pack("<i", x.shape[1]) + b"\x86")
      out.extend(b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
      out.extend(b"\x89")  # NEWFALSE: not Fortran order
      put(np.ascontiguousarray(x).tobytes())
      out.extend(b"tb")
    else:
      raise TypeError(type(x))

  put(obj)
  return bytes(out + b".")


def _write_tar(path, folder, members):
  with tarfile.open(path, "w:gz") as tar:
    info = tarfile.TarInfo(folder)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tar.addfile(info)
    for name, data in members.items():
      info = tarfile.TarInfo(f"{folder}/{name}")
      info.size = len(data)
      info.mode = 0o644
      tar.addfile(info, io.BytesIO(data))
  return str(path)


def python_members(cifar):
  members = {"batches.meta": _py2_pickle({
      b"num_cases_per_batch": PER_BATCH, b"label_names": [n.encode() for n in cifar10.CIFAR10_LABEL_NAMES],
      b"num_vis": 3072})}
  for name, x, y in _batches(cifar):
    members[name] = _py2_pickle({
        b"batch_label": b"synthetic " + name.encode(), b"labels": [int(v) for v in y], b"data": _rows(x),
        b"filenames": [b"img_%d.png" % i for i in range(len(x))]})
  members["readme.html"] = b"<html></html>"
  return members


def binary_members(cifar):
  members = {"batches.meta.txt": ("\n".join(cifar10.CIFAR10_LABEL_NAMES) + "\n\n").encode()}
  for name, x, y in _batches(cifar):
    members[name + ".bin"] = np.concatenate([y[:, None], _rows(x)], axis=1).tobytes()
  members["readme.html"] = b"<html></html>"
  return members


@pytest.fixture(scope="module")
def archives(cifar, tmp_path_factory):
  root = tmp_path_factory.mktemp("archives")
  return {"python": _write_tar(root / "cifar-10-python.tar.gz", "cifar-10-batches-py", python_members(cifar)),
          "binary": _write_tar(root / "cifar-10-binary.tar.gz", "cifar-10-batches-bin", binary_members(cifar))}


@pytest.fixture(scope="module")
def prepared(archives, tmp_path_factory):
  """kind -> a tfds data dir with cifar10 built from that archive (MD5 check off, test-only counts)."""
  out = {}
  for kind, path in archives.items():
    data_dir = str(tmp_path_factory.mktemp(f"tfds_{kind}"))
    built = cifar10.prepare_cifar10(path, data_dir, verify_md5=False, num_examples=COUNTS)
    assert built == os.path.join(data_dir, "cifar10", "3.0.2")
    out[kind] = data_dir
  return out


def _read_all(data_dir, split):
  source = tfds.data_source("cifar10", split=split, data_dir=data_dir, download=False)
  return [source[i] for i in range(len(source))]


def _text(value):
  return value.decode() if isinstance(value, bytes) else str(value)


@pytest.mark.parametrize("kind", ["python", "binary"])
def test_archive_builds_the_standard_tfds_cifar10(kind, prepared, cifar):
  data_dir = prepared[kind]
  builder = tfds.builder("cifar10", data_dir=data_dir)
  assert builder.is_prepared() and builder.name == "cifar10" and str(builder.version) == "3.0.2"
  assert builder.version == tfds.builder_cls("cifar10").VERSION
  assert "array_record" in str(builder.info.file_format).lower()
  # The features are the stock builder's: id Text, image (32, 32, 3) uint8, label ClassLabel(10) + names.
  stock = tfds.builder_cls("cifar10")(data_dir=os.path.join(data_dir, "unused")).info.features
  assert builder.info.features.to_json() == stock.to_json()
  features = builder.info.features
  assert features["image"].shape == (32, 32, 3) and features["image"].np_dtype == np.uint8
  assert features["label"].names == list(cifar10.CIFAR10_LABEL_NAMES)
  assert isinstance(features["id"], tfds.features.Text)
  assert builder.info.supervised_keys == ("image", "label")
  for split, (images, labels) in cifar.items():
    assert builder.info.splits[split].num_examples == COUNTS[split]
    records = _read_all(data_dir, split)
    # tfds orders records by the hash of their key (salted with the split name); the stock builder's keys
    # are the example indices, so this is the order tfds' own preparation gives.
    hasher = hashing.Hasher(split)
    expected_order = sorted(range(COUNTS[split]), key=hasher.hash_key)
    assert [_text(r["id"]) for r in records] == ["%s_%05d" % (split, i) for i in expected_order]
    for record, index in zip(records, expected_order):
      assert record["image"].dtype == np.uint8 and record["image"].shape == (32, 32, 3)
      np.testing.assert_array_equal(record["image"], images[index])
      assert int(record["label"]) == int(labels[index])


def test_python_and_binary_archives_give_identical_datasets(prepared):
  for split in ("train", "test"):
    py, binary = _read_all(prepared["python"], split), _read_all(prepared["binary"], split)
    assert len(py) == len(binary) == COUNTS[split]
    for a, b in zip(py, binary):
      assert _text(a["id"]) == _text(b["id"]) and int(a["label"]) == int(b["label"])
      np.testing.assert_array_equal(a["image"], b["image"])
  # Byte-identical record files too (the same keys, the same PNG bytes).
  for split in ("train", "test"):
    dirs = {k: os.path.join(d, "cifar10", "3.0.2") for k, d in prepared.items()}
    names = sorted(f for f in os.listdir(dirs["python"]) if f.startswith(f"cifar10-{split}."))
    assert names and names == sorted(f for f in os.listdir(dirs["binary"]) if f.startswith(f"cifar10-{split}."))
    for name in names:
      with open(os.path.join(dirs["python"], name), "rb") as f1, open(os.path.join(dirs["binary"], name), "rb") as f2:
        assert f1.read() == f2.read()


def test_script_builds_and_is_idempotent(archives, tmp_path, monkeypatch, capsys, script):
  monkeypatch.setattr(cifar10, "CIFAR10_NUM_EXAMPLES", COUNTS)  # the script's counts, for the small archive
  data_dir = str(tmp_path / "tfds")
  argv = ["--dataset", "CIFAR10", "--source", archives["binary"], "--data_dir", data_dir, "--no-verify"]
  assert script.main(argv) == 0
  assert "CIFAR10 ready in" in capsys.readouterr().out
  assert len(tfds.data_source("cifar10", split="test", data_dir=data_dir)) == COUNTS["test"]
  assert script.main(argv) == 0  # already prepared: the archive is checked again, nothing rebuilt
  # Without --no-verify the (synthetic) archive fails the MD5 check of the official archives.
  assert script.main(argv[:-1]) == 2
  err = capsys.readouterr().err
  assert err.startswith("ERROR: ") and err.count("\n") == 1
  assert "MD5" in err and cifar10.CIFAR10_ARCHIVES["python"].md5 in err and "--no-verify" in err
  # ... and passes it when its MD5 is the expected one (as the official archive's is).
  with open(archives["binary"], "rb") as f:
    md5 = hashlib.md5(f.read()).hexdigest()
  monkeypatch.setitem(cifar10.CIFAR10_ARCHIVES, "binary",
                      dataclasses.replace(cifar10.CIFAR10_ARCHIVES["binary"], md5=md5))
  assert script.main(argv[:-1]) == 0


def _write(path, data):
  path.write_bytes(data)
  return str(path)


def _truncated(path, tmp_path):
  data = pathlib.Path(path).read_bytes()
  out = tmp_path / "truncated.tar.gz"
  out.write_bytes(data[:len(data) // 2])
  return str(out)


def _without(members, drop, tmp_path, folder="cifar-10-batches-bin"):
  return _write_tar(tmp_path / "partial.tar.gz", folder, {k: v for k, v in members.items() if k != drop})


def _short_batch(members, tmp_path):
  members = dict(members)
  members["data_batch_3.bin"] = members["data_batch_3.bin"][:-10]
  return _write_tar(tmp_path / "short.tar.gz", "cifar-10-batches-bin", members)


def _evil_pickle(members, tmp_path):
  members = dict(members)

  class Evil:
    def __reduce__(self):
      return (os.system, ("echo the unsafe pickle ran",))

  members["data_batch_2"] = pickle.dumps({b"data": Evil()}, protocol=2)
  return _write_tar(tmp_path / "evil.tar.gz", "cifar-10-batches-py", members)


BAD_INPUTS = {
    "missing file": (lambda a, c, t: str(t / "nowhere" / "cifar-10-python.tar.gz"), "no such file"),
    "directory": (lambda a, c, t: str(t), "not a file"),
    "not an archive": (lambda a, c, t: _write(t / "x.tar.gz", b"hello, not a tarball" * 50),
                       "not a \\(gzipped\\) tar archive"),
    "truncated": (lambda a, c, t: _truncated(a["python"], t), "truncated or corrupt"),
    "truncated header": (lambda a, c, t: _write(t / "c.tar.gz", pathlib.Path(a["binary"]).read_bytes()[:100]),
                         "gzip file but not a readable tar archive: it is truncated or corrupt"),
    "wrong archive": (lambda a, c, t: _write_tar(t / "cifar-100-python.tar.gz", "cifar-100-python",
                                                 {"train": b"x"}), "no cifar-10-batches-py/ or cifar-10-batches-bin/"),
    "missing member": (lambda a, c, t: _without(binary_members(c), "data_batch_4.bin", t), "lacks data_batch_4.bin"),
    "short batch": (lambda a, c, t: _short_batch(binary_members(c), t),
                    "data_batch_3.bin has .* bytes, expected 3 records"),
    "unsafe pickle": (lambda a, c, t: _evil_pickle(python_members(c), t),
                      "data_batch_2 is not a valid pickled.*refusing to load the global .*system"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_one_line_error_exit_2_nothing_written(case, archives, cifar, tmp_path, monkeypatch, capsys,
                                                        script):
  monkeypatch.setattr(cifar10, "CIFAR10_NUM_EXAMPLES", COUNTS)
  make, pattern = BAD_INPUTS[case]
  (tmp_path / "in").mkdir()
  source = make(archives, cifar, tmp_path / "in")
  data_dir = tmp_path / "tfds"
  assert script.main(["--dataset", "CIFAR10", "--source", source, "--data_dir", str(data_dir), "--no-verify"]) == 2
  captured = capsys.readouterr()
  assert captured.err.startswith("ERROR: ") and captured.err.count("\n") == 1, captured.err
  assert "CIFAR-10 archive" in captured.err and source in captured.err
  assert "cifar.html" in captured.err  # says how to fix it
  assert re.search(pattern, captured.err), captured.err
  assert not data_dir.exists() or not any(data_dir.iterdir())


def test_failure_while_writing_leaves_nothing(archives, tmp_path, monkeypatch):
  calls, original = [], cifar10.png_bytes

  def failing_png(image, level=6):  # the disk fills up after a few examples
    calls.append(1)
    if len(calls) > 7:
      raise OSError("No space left on device")
    return original(image, level)

  monkeypatch.setattr(cifar10, "png_bytes", failing_png)
  data_dir = tmp_path / "tfds"
  with pytest.raises(OSError, match="No space left"):
    cifar10.prepare_cifar10(archives["python"], str(data_dir), verify_md5=False, num_examples=COUNTS)
  assert len(calls) > 7
  leftovers = [os.path.join(d, f) for d, ds, fs in os.walk(data_dir) for f in ds + fs] if data_dir.exists() else []
  assert not leftovers, leftovers
  assert not tfds.builder("cifar10", data_dir=str(data_dir)).is_prepared()


def test_wrong_counts_and_options_are_errors(archives, tmp_path, capsys, script):
  # The real counts (50000/10000) against the small archive: a clear per-batch error.
  with pytest.raises(cifar10.Cifar10DataError, match="data_batch_1.bin has .* expected 10000 records"):
    cifar10.load_cifar10_archive(archives["binary"], verify_md5=False)
  assert script.main(["--dataset", "SVHN", "--source", archives["binary"], "--data_dir", str(tmp_path)]) == 2
  assert capsys.readouterr().err.startswith("ERROR: --source is for --dataset CIFAR10 only")


def test_subprocess_exit_status_and_mnist_convention(tmp_path):
  # As a user runs it: status 2 and one `ERROR:` line, for CIFAR-10 and MNIST alike.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for args, what in ((["--dataset", "CIFAR10", "--source", str(tmp_path / "none.tar.gz")], "no such file"),
                     (["--dataset", "MNIST", "--mnist_dir", str(tmp_path / "no_mnist")], "does not exist")):
    data_dir = tmp_path / args[1]
    proc = subprocess.run([sys.executable, SCRIPT, *args, "--data_dir", str(data_dir)],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    errors = [l for l in proc.stderr.splitlines() if "ERROR" in l]
    assert len(errors) == 1 and errors[0].startswith("ERROR: ") and what in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    # No files at all (tfds' MNIST route may leave its empty `downloads/` folder).
    assert not [f for _, _, fs in os.walk(data_dir) for f in fs]
  assert not (tmp_path / "CIFAR10").exists()


def test_python3_repickled_batches_read_the_same(cifar, tmp_path):
  # An archive whose batches were re-pickled by Python 3 (other pickle opcodes, numpy._core) reads the same.
  members = {name: (pickle.dumps(pickle.loads(data, encoding="bytes"), protocol=proto)
                    if not name.endswith(".html") else data)
             for proto, (name, data) in zip([2, 3, 4, 5, 2, 3, 4, 5], python_members(cifar).items())}
  path = _write_tar(tmp_path / "repickled.tar.gz", "cifar-10-batches-py", members)
  arrays = cifar10.load_cifar10_archive(path, verify_md5=False, num_examples=COUNTS)
  assert arrays.kind == "python" and arrays.label_names == cifar10.CIFAR10_LABEL_NAMES
  for split, (images, labels) in cifar.items():
    np.testing.assert_array_equal(arrays.images[split], images)
    np.testing.assert_array_equal(arrays.labels[split], labels)


def test_existing_cifar10_in_another_format_is_a_clear_error(archives, tmp_path):
  # A cifar10 prepared earlier by tfds as TFRecord (simulated by its dataset_info.json) is not silently used.
  data_dir = str(tmp_path / "tfds")
  cifar10.prepare_cifar10(archives["binary"], data_dir, verify_md5=False, num_examples=COUNTS)
  info_path = os.path.join(data_dir, "cifar10", "3.0.2", "dataset_info.json")
  with open(info_path) as f:
    info = json.load(f)
  info["fileFormat"] = "tfrecord"
  with open(info_path, "w") as f:
    json.dump(info, f)
  with pytest.raises(cifar10.Cifar10DataError, match="already holds a cifar10 .*TFRecord.*delete"):
    cifar10.prepare_cifar10(archives["binary"], data_dir, verify_md5=False, num_examples=COUNTS)
