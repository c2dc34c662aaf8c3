"""Data pipelines: real MNIST from ../shared through tfds, mocked tfds datasets, toy data.

The MNIST tfds dataset is built once per session into a temporary data dir (never into the repo).
"""
import collections
import gzip
import json
import math
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from score_sde_jax import config_defaults
from score_sde_jax import datasets
from score_sde_jax.datasets import builders, images, iterators


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def mnist_source(shared_dir):
  path = os.path.join(shared_dir, "data", "mnist")
  if not os.path.isdir(path):
    pytest.skip(f"{path} is not present")
  return path


@pytest.fixture(scope="session")
def mnist_data_dir(mnist_source, tmp_path_factory):
  """A tfds data dir with MNIST built by the pipeline's automatic first-use step."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  old = os.environ.get("SCORE_SDE_MNIST_DIR")
  os.environ["SCORE_SDE_MNIST_DIR"] = mnist_source
  try:
    config = mnist_config_for(data_dir)
    it = datasets.get_eval_iterator(config, batch_size=100, process_count=1)  # builds the dataset
    assert it.num_examples == 10000
  finally:
    if old is None:
      del os.environ["SCORE_SDE_MNIST_DIR"]
    else:
      os.environ["SCORE_SDE_MNIST_DIR"] = old
  return data_dir


def mnist_config_for(data_dir, **data):
  config = config_defaults.base_config()
  config.data.dataset = "MNIST"
  config.data.image_size = 28
  config.data.num_channels = 1
  config.data.random_flip = False
  config.data.tfds_data_dir = data_dir
  config.training.batch_size = 64
  config.eval.batch_size = 500
  for k, v in data.items():
    config.data[k] = v
  return config


@pytest.fixture
def mnist_config(mnist_data_dir):
  return lambda **data: mnist_config_for(mnist_data_dir, **data)


def idx_arrays(source_dir, split):
  """Images [N, 28, 28] and labels [N] read straight from the IDX files (independent of the package)."""
  prefix = "train" if split == "train" else "t10k"
  with gzip.open(os.path.join(source_dir, f"{prefix}-images-idx3-ubyte.gz")) as f:
    imgs = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
  with gzip.open(os.path.join(source_dir, f"{prefix}-labels-idx1-ubyte.gz")) as f:
    labels = np.frombuffer(f.read(), np.uint8, offset=8)
  return imgs, labels


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


# ------------------------------------------------------------------------------------------------ real MNIST


def test_mnist_builds_with_expected_splits_and_labels(mnist_data_dir, mnist_source, mnist_config):
  # The standard tfds reader sees the standard `mnist` dataset in the array_record format.
  builder = tfds.builder("mnist", data_dir=mnist_data_dir)
  assert builder.is_prepared()
  assert "array_record" in str(builder.info.file_format).lower()
  assert {s: builder.info.splits[s].num_examples for s in ("train", "test")} == {"train": 60000, "test": 10000}
  ds = tfds.data_source("mnist", data_dir=mnist_data_dir, download=False,
                        decoders={"image": tfds.decode.SkipDecoding()})
  assert len(ds["train"]) == 60000 and len(ds["test"]) == 10000
  train_labels = np.array([ex["label"] for ex in ds["train"].__getitems__(list(range(60000)))])
  _, idx_train_labels = idx_arrays(mnist_source, "train")
  np.testing.assert_array_equal(np.bincount(train_labels, minlength=10), np.bincount(idx_train_labels, minlength=10))
  np.testing.assert_array_equal(np.bincount(train_labels, minlength=10),
                                [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])
  assert datasets.get_train_iterator(mnist_config(), process_count=1).num_examples == 60000


def test_mnist_test_split_through_pipeline_equals_idx_files(mnist_config, mnist_source):
  """Every test example comes out once, with pixels and labels exactly those of the IDX files."""
  it = datasets.get_eval_iterator(mnist_config(), "test", batch_size=768, process_count=1)
  assert it.num_examples == 10000 and len(it) == math.ceil(10000 / 768)
  got = collections.Counter()
  labels = []
  for batch in it:
    assert batch["image"].shape == (768, 28, 28, 1) and batch["image"].dtype == np.float32
    assert batch["image_int"].dtype == np.uint8 and batch["label"].dtype == np.int32
    np.testing.assert_allclose(batch["image"], batch["image_int"] / 255.0, atol=1e-7)
    m = batch["mask"]
    assert not batch["image_int"][~m].any()
    for img, lab in zip(batch["image_int"][m], batch["label"][m]):
      got[(int(lab), img.tobytes())] += 1
    labels.append(batch["label"][m])
  assert sum(got.values()) == 10000
  imgs, idx_labels = idx_arrays(mnist_source, "test")
  want = collections.Counter((int(l), im.tobytes()) for im, l in zip(imgs, idx_labels))
  assert got == want
  np.testing.assert_array_equal(np.bincount(np.concatenate(labels), minlength=10),
                                [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])


@pytest.mark.parametrize("process_count", [2, 4])
def test_eval_iterator_sharded_hosts_cover_split_once(mnist_config, process_count):
  config = mnist_config()
  # One shared source (decoded once) for the single-host reference and the simulated hosts.
  ref = datasets.get_eval_iterator(config, "test", batch_size=800, process_count=1)
  source = ref._source  # pylint: disable=protected-access

  def keys(it):
    out = collections.Counter()
    for batch in it:
      m = batch["mask"]
      out.update(img.tobytes() + bytes([lab]) for img, lab in zip(batch["image_int"][m], batch["label"][m]))
    return out

  want = keys(ref)
  assert sum(want.values()) == 10000
  union = collections.Counter()
  lengths = set()
  for p in range(process_count):
    it = images.EvalIterator(source, global_batch=800, host_batch=800 // process_count, process_index=p,
                             process_count=process_count)
    lengths.add(len(it))
    assert it.num_host_examples > 0
    union.update(keys(it))
  assert lengths == {math.ceil(10000 / 800)}  # every host runs the same number of batches
  assert union == want  # as multisets: each example on exactly one host, exactly once


def test_train_determinism_and_seed(mnist_config):
  config = mnist_config(random_flip=True, uniform_dequantization=True)
  a = take(datasets.get_train_iterator(config, process_count=1), 3)
  b = take(datasets.get_train_iterator(config, process_count=1), 3)
  assert_batches_equal(a, b)
  c = take(datasets.get_train_iterator(config, seed=config.seed + 1, process_count=1), 1)
  assert not np.array_equal(a[0]["label"], c[0]["label"])
  assert a[0]["image"].shape == (64, 28, 28, 1) and a[0]["image"].dtype == np.float32
  assert a[0]["label"].shape == (64,) and a[0]["label"].dtype == np.int32
  # consecutive batches differ and one epoch visits every example once
  assert not np.array_equal(a[0]["image"], a[1]["image"])


def test_train_epoch_is_a_permutation():
  """Positions j = 0..N-1 of the stream map to each example exactly once; the next epoch reshuffles."""
  order = iterators.GlobalOrder(1000, seed=7)
  first = order.keys(np.arange(1000))
  second = order.keys(np.arange(1000, 2000))
  assert sorted(first) == list(range(1000)) and sorted(second) == list(range(1000))
  assert not np.array_equal(first, second)


def test_order_is_the_samplers():
  """GlobalOrder's keys and generators are Grain's IndexSampler's, `sampler[j].record_key` and
  `sampler[j].rng` (so a Grain upgrade that moves them fails here): three epochs of an odd size, and
  config seeds past 32 bits and negative; generators compared on their first 8 raw outputs."""
  for n, seed in ((37, 3), (1000, 2**40 + 5), (5, -1)):
    order = iterators.GlobalOrder(n, seed)
    positions = np.arange(3 * n)
    np.testing.assert_array_equal(order.keys(positions), [order.sampler[j].record_key for j in positions])
    for j in (0, n - 1, n, 3 * n - 1):
      np.testing.assert_array_equal(order.rng(j).bit_generator.random_raw(8),
                                    order.sampler[int(j)].rng.bit_generator.random_raw(8))


def test_adjacent_seeds_do_not_share_epochs():
  """Grain seeds epoch e with s + e: hashing the config seed keeps seed 1's first epoch from being seed 0's
  second (two independent permutations of 1000 agree on 1 position on average; 5 or more: p < 0.004)."""
  assert len({iterators.data_seed(s) for s in range(100)}) == 100
  a = iterators.GlobalOrder(1000, 0).keys(np.arange(1000, 2000))
  b = iterators.GlobalOrder(1000, 1).keys(np.arange(1000))
  assert np.sum(a == b) < 5


def test_image_batches_are_the_samplers_records(mnist_config):
  """Host p's batch of step k is records sampler[j] for j in [kB + pb, kB + (p+1)b), each augmented by
  Augment with its own generator sampler[j].rng."""
  config = mnist_config(random_flip=True, uniform_dequantization=True)
  it = datasets.get_train_iterator(config, process_index=1, process_count=2)
  step = 3
  got = it.batch_at(step)
  sampler = iterators.GlobalOrder(60000, config.seed).sampler
  records = [sampler[step * 64 + 32 + i] for i in range(32)]
  raw, labels = it._source.get(np.array([r.record_key for r in records]))  # pylint: disable=protected-access
  augment = iterators.Augment(random_flip=True, dequantize=True)
  want = np.stack([augment.random_map(x, r.rng) for x, r in zip(raw, records)])
  np.testing.assert_array_equal(got["image"], want)
  np.testing.assert_array_equal(got["label"], labels)


def test_value_ranges_and_scalers(mnist_config):
  for centered in (False, True):
    config = mnist_config(centered=centered)
    batch = next(datasets.get_train_iterator(config, process_count=1))
    x = batch["image"]
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.99 and x.min() == 0.0
    scaled = datasets.get_data_scaler(config)(x)
    if centered:
      assert scaled.min() == -1.0 and scaled.max() == pytest.approx(1.0)
    else:
      np.testing.assert_array_equal(scaled, x)
    np.testing.assert_allclose(datasets.get_data_inverse_scaler(config)(scaled), x, atol=1e-6)
  toy = config_defaults.toy_config()
  assert toy.data.centered  # toy data: scalers are the identity even when centered
  y = np.linspace(-3, 3, 7)
  np.testing.assert_array_equal(datasets.get_data_scaler(toy)(y), y)
  np.testing.assert_array_equal(datasets.get_data_inverse_scaler(toy)(y), y)


def test_uniform_dequantization(mnist_config):
  plain = take(datasets.get_train_iterator(mnist_config(), process_count=1), 4)
  deq = take(datasets.get_train_iterator(mnist_config(uniform_dequantization=True), process_count=1), 4)
  for p, d in zip(plain, deq):
    np.testing.assert_array_equal(p["label"], d["label"])  # same examples, same order
    x_int = np.round(p["image"] * 255.0)
    scaled = d["image"] * 256.0
    # (x + u) / 256 with u in [0, 1): the integer part is the pixel, the fractional part is the noise
    np.testing.assert_array_equal(np.floor(scaled), x_int)
    assert d["image"].min() >= 0.0 and d["image"].max() < 1.0
  u = np.concatenate([(d["image"] * 256.0 - np.round(p["image"] * 255.0)).ravel() for p, d in zip(plain, deq)])
  assert u.min() >= 0.0 and u.max() < 1.0
  assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
  hist = np.histogram(u, bins=10, range=(0, 1))[0] / u.size
  np.testing.assert_allclose(hist, 0.1, atol=0.01)


def test_dequantization_stays_in_its_bin():
  """(x + u) / 256 is exact in float32: floor(256 * value) == x and value < 1, also for x = 255."""
  x = np.full((64, 32, 32, 3), 255, np.uint8)
  x[::2] = 0
  augment = iterators.Augment(random_flip=False, dequantize=True)
  order = iterators.GlobalOrder(64, seed=3)
  out = np.stack([augment.random_map(xi, order.rng(j)) for j, xi in enumerate(x)])
  assert out.dtype == np.float32 and out.max() < 1.0
  np.testing.assert_array_equal(np.floor(out * 256.0), x)
  frac = out * 256.0 - x
  assert 0.49 < frac.mean() < 0.51


def test_random_flip(mnist_config):
  n = 8
  plain = take(datasets.get_train_iterator(mnist_config(), process_count=1), n)
  flip = take(datasets.get_train_iterator(mnist_config(random_flip=True), process_count=1), n)
  flipped = kept = 0
  for p, f in zip(plain, flip):
    for x, y in zip(p["image"], f["image"]):
      if np.array_equal(x, x[:, ::-1]):  # mirror-symmetric: cannot tell
        np.testing.assert_array_equal(x, y)
      elif np.array_equal(x, y):
        kept += 1
      elif np.array_equal(x[:, ::-1], y):
        flipped += 1
      else:
        raise AssertionError("a flipped batch entry is neither the image nor its mirror image")
  total = flipped + kept
  assert total >= 64 * n - 2
  assert abs(flipped / total - 0.5) < 4 * 0.5 / np.sqrt(total)  # binomial(total, 1/2), 4 sigma
  # eval batches are never flipped or dequantized
  config = mnist_config(random_flip=True, uniform_dequantization=True)
  batch = next(datasets.get_eval_iterator(config, batch_size=100, process_count=1))
  np.testing.assert_array_equal(batch["image"], batch["image_int"] / np.float32(255.0))


def test_state_round_trip_resumes_same_batches(mnist_config):
  config = mnist_config(random_flip=True, uniform_dequantization=True)
  it = datasets.get_train_iterator(config, process_count=1)
  take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  assert state["step"] == 3
  want = take(it, 3)
  resumed = datasets.get_train_iterator(config, process_count=1)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 3), want)
  # Resuming with two hosts instead of one continues the same global stream.
  hosts = [datasets.get_train_iterator(config, process_index=p, process_count=2) for p in range(2)]
  for h in hosts:
    h.set_state(state)
  for step in range(2):
    parts = [next(h) for h in hosts]
    for k in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([q[k] for q in parts]), want[step][k])
  with pytest.raises(ValueError, match="seed"):
    datasets.get_train_iterator(config, seed=1, process_count=1).set_state(state)


def test_state_of_an_earlier_order_resumes_at_its_step_with_a_note(mnist_config):
  """A data position saved before Grain's sampler (no 'order' field) resumes at its step, in this order,
  and says so; a current state says nothing."""
  config = mnist_config()
  it = datasets.get_train_iterator(config, process_count=1)
  old = {"step": 5, "seed": config.seed, "dataset": "MNIST", "global_batch_size": 64, "num_examples": 60000}
  note = it.set_state(old)
  assert "SplitMix64" in note and "global batch 5" in note and iterators.ORDER in note
  fresh = datasets.get_train_iterator(config, process_count=1)
  assert fresh.set_state({**old, "order": iterators.ORDER}) is None
  assert_batches_equal(take(it, 2), [fresh.batch_at(5), fresh.batch_at(6)])


def test_train_hosts_are_slices_of_global_batch(mnist_config):
  config = mnist_config(random_flip=True)
  whole = take(datasets.get_train_iterator(config, process_count=1), 2)
  for count in (2, 4):
    parts = [take(datasets.get_train_iterator(config, process_index=p, process_count=count), 2)
             for p in range(count)]
    for step in range(2):
      assert parts[0][step]["image"].shape[0] == 64 // count
      for k in ("image", "label"):
        np.testing.assert_array_equal(np.concatenate([parts[p][step][k] for p in range(count)]), whole[step][k])


def test_mnist_resize_when_image_size_differs(mnist_config):
  batch = next(datasets.get_eval_iterator(mnist_config(image_size=32), batch_size=10, process_count=1))
  assert batch["image"].shape == (10, 32, 32, 1) and batch["image_int"].dtype == np.uint8


# ------------------------------------------------------------------------------------------------ errors


def test_prepare_mnist_is_idempotent(mnist_data_dir, mnist_source):
  import time  # pylint: disable=import-outside-toplevel
  start = time.time()
  path = datasets.prepare_mnist(mnist_source, mnist_data_dir)
  assert path.endswith(os.path.join("mnist", "3.0.1")) and time.time() - start < 10


@pytest.fixture
def mnist_copy(mnist_source, tmp_path):
  src = tmp_path / "mnist_src"
  shutil.copytree(mnist_source, src)
  for p in src.iterdir():
    os.chmod(p, 0o644)
  return src


def test_corrupt_file_gives_checksum_error(mnist_copy, tmp_path):
  target = mnist_copy / "t10k-labels-idx1-ubyte.gz"
  data = bytearray(gzip.decompress(target.read_bytes()))
  data[100] = (data[100] + 1) % 10  # a valid gzip file holding one wrong label
  target.write_bytes(gzip.compress(bytes(data)))
  with pytest.raises(datasets.MnistDataError, match="t10k-labels-idx1-ubyte.*[Cc]hecksum|[Cc]hecksum.*t10k-labels"):
    datasets.prepare_mnist(str(mnist_copy), str(tmp_path / "tfds"))
  assert not (tmp_path / "tfds" / "mnist" / "3.0.1").exists()  # nothing half-built is left as prepared


def test_truncated_gzip_and_missing_file_errors(mnist_copy, tmp_path):
  target = mnist_copy / "train-labels-idx1-ubyte.gz"
  target.write_bytes(target.read_bytes()[:1000])
  with pytest.raises(datasets.MnistDataError, match="train-labels-idx1-ubyte.*corrupt"):
    datasets.prepare_mnist(str(mnist_copy), str(tmp_path / "tfds"))
  target.unlink()
  with pytest.raises(datasets.MnistDataError, match="train-labels-idx1-ubyte.*missing.*prepare_data.py"):
    datasets.prepare_mnist(str(mnist_copy), str(tmp_path / "tfds"))


def test_missing_data_errors(tmp_path, monkeypatch):
  config = config_defaults.base_config()
  config.data.tfds_data_dir = str(tmp_path / "empty")
  with pytest.raises(datasets.DataError, match="CIFAR10.*not prepared.*prepare_data.py --dataset CIFAR10"):
    datasets.get_train_iterator(config, process_count=1)
  # MNIST: nothing prepared and the named local directory does not exist.
  monkeypatch.setenv("SCORE_SDE_MNIST_DIR", str(tmp_path / "no_mnist_here"))
  mconfig = mnist_config_for(str(tmp_path / "empty"))
  with pytest.raises(datasets.MnistDataError, match="does not exist.*prepare_data.py"):
    datasets.get_eval_iterator(mconfig, process_count=1)


def test_bad_config_errors(mnist_config):
  config = config_defaults.base_config()
  config.data.dataset = "IMAGENET"
  with pytest.raises(ValueError, match="IMAGENET.*CIFAR10.*MNIST"):
    datasets.get_train_iterator(config, process_count=1)
  with pytest.raises(ValueError, match="not divisible.*3"):
    datasets.get_train_iterator(mnist_config(), batch_size=64, process_count=3)
  with pytest.raises(ValueError, match="num_channels"):
    datasets.get_train_iterator(mnist_config(num_channels=3), process_count=1)


# ------------------------------------------------------------------------------------------------ mocked tfds


MOCK_CASES = [
    ("CIFAR10", 32, {}),
    ("SVHN", 32, {}),
    ("CELEBA", 64, {}),
    ("LSUN", 32, {"category": "bedroom"}),
    ("LSUN", 128, {"category": "church_outdoor"}),
    ("FFHQ", 64, {}),
    ("CelebAHQ", 64, {}),
]


@pytest.mark.parametrize("name,size,extra", MOCK_CASES, ids=[f"{c[0]}-{c[1]}" for c in MOCK_CASES])
def test_mock_datasets_pipeline(name, size, extra, tmp_path):
  config = config_defaults.base_config()
  config.data.dataset = name
  config.data.image_size = size
  config.data.num_channels = 3
  config.data.uniform_dequantization = True
  config.data.tfds_data_dir = str(tmp_path)
  for k, v in extra.items():
    config.data[k] = v
  with tfds.testing.mock_data(num_examples=20):
    it = datasets.get_train_iterator(config, batch_size=8, process_count=1)
    a = take(it, 3)  # crosses the epoch boundary (20 examples, batches of 8)
    assert a[0]["image"].shape == (8, size, size, 3) and a[0]["image"].dtype == np.float32
    assert a[0]["label"].shape == (8,) and a[0]["label"].dtype == np.int32
    for b in a:
      assert 0.0 <= b["image"].min() and b["image"].max() < 1.0
    resumed = datasets.get_train_iterator(config, batch_size=8, process_count=1)
    resumed.set_state(json.loads(json.dumps({**it.get_state(), "step": 1})))
    assert_batches_equal(take(resumed, 2), a[1:])
    ev = datasets.get_eval_iterator(config, batch_size=8, process_count=1)
    assert len(ev) == 3 and ev.num_examples == 20
    batches = list(ev)
    assert len(batches) == 3 and sum(int(b["mask"].sum()) for b in batches) == 20
    assert batches[-1]["mask"].tolist() == [True] * 4 + [False] * 4
    for b in batches:
      assert b["image"].shape == (8, size, size, 3) and b["image_int"].dtype == np.uint8
      assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0


# ------------------------------------------------------------------------------------------------ toy data


def test_toy_iterators():
  config = config_defaults.toy_config(dataset="ring8")
  config.data.num_train = 1000
  config.data.num_test = 203
  config.training.batch_size = 128
  it = datasets.get_train_iterator(config, process_count=1)
  a = take(it, 10)  # > 1 epoch
  assert a[0]["image"].shape == (128, 2) and a[0]["image"].dtype == np.float32
  assert set(a[0]) == {"image"}
  b = take(datasets.get_train_iterator(config, process_count=1), 10)
  assert_batches_equal(a, b)
  # the first epoch (positions 0..999) is a permutation of the fixed training sample
  stream = np.concatenate([x["image"] for x in a])
  train = it._source.data  # pylint: disable=protected-access
  assert sorted(map(tuple, stream[:1000])) == sorted(map(tuple, train))
  resumed = datasets.get_train_iterator(config, process_count=1)
  resumed.set_state(json.loads(json.dumps({**it.get_state(), "step": 7})))
  assert_batches_equal(take(resumed, 3), a[7:])
  # held-out sample: every point once, disjoint from the training sample, split over hosts
  ev = datasets.get_eval_iterator(config, batch_size=64, process_count=1)
  assert len(ev) == 4 and ev.num_examples == 203
  test_pts = np.concatenate([x["image"][x["mask"]] for x in ev])
  assert test_pts.shape == (203, 2) and len(set(map(tuple, test_pts))) == 203
  assert not set(map(tuple, test_pts)) & set(map(tuple, train))
  parts = []
  for p in range(2):
    ev_p = datasets.get_eval_iterator(config, batch_size=64, process_index=p, process_count=2)
    parts += [x["image"][x["mask"]] for x in ev_p]
  assert sorted(map(tuple, np.concatenate(parts))) == sorted(map(tuple, test_pts))


def test_training_pipeline_never_imports_tensorflow(mnist_data_dir):
  """Reading, even where TensorFlow is installed, does not import it (fresh interpreter)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  code = (
      "import sys\n"
      "from score_sde_jax import config_defaults, datasets\n"
      "c = config_defaults.base_config(); c.data.dataset = 'MNIST'; c.data.image_size = 28\n"
      "c.data.num_channels = 1; c.data.uniform_dequantization = True\n"
      f"c.data.tfds_data_dir = {mnist_data_dir!r}; c.training.batch_size = 32\n"
      "it = datasets.get_train_iterator(c, process_count=1); next(it); next(it)\n"
      "ev = datasets.get_eval_iterator(c, batch_size=50, process_count=1); next(ev)\n"
      "print('TF_IMPORTED' if 'tensorflow' in sys.modules else 'TF_FREE')\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True,
                       timeout=120, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == "TF_FREE"


def test_shipped_image_configs_map_to_datasets():
  """Every image config under configs/ names a known dataset whose channels match."""
  import glob  # pylint: disable=import-outside-toplevel
  from score_sde_jax.run import config_utils  # pylint: disable=import-outside-toplevel
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  files = sorted(glob.glob(os.path.join(repo, "configs", "**", "*.py"), recursive=True))
  checked = 0
  for path in files:
    try:
      config = config_utils.load_config_file(path)
    except ValueError:   # a helper module without get_config()
      continue
    if config.data.dataset in config_defaults.TOY_DATASETS:
      continue
    ds = images._spec(config)  # pylint: disable=protected-access
    assert config.data.num_channels == ds.num_channels, path
    checked += 1
  if not checked:
    pytest.skip("no image configs found")


def test_ffhq_builder_prepares_without_tensorflow(tmp_path):
  """The FFHQ builder turns a folder of images into tfds array_record files the pipeline reads."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  folder = tmp_path / "manual" / "ffhq" / "00000"
  folder.mkdir(parents=True)
  for i in range(6):
    Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
  import importlib.util  # pylint: disable=import-outside-toplevel
  script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "prepare_data.py")
  spec = importlib.util.spec_from_file_location("prepare_data_script", script)
  prepare_data = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(prepare_data)
  data_dir = str(tmp_path / "tfds")
  assert prepare_data.main(["--dataset", "FFHQ", "--image_size", "64", "--data_dir", data_dir,
                            "--manual_dir", str(tmp_path / "manual")]) == 0
  config = config_defaults.base_config()
  config.data.dataset, config.data.image_size, config.data.tfds_data_dir = "FFHQ", 64, data_dir
  batches = list(datasets.get_eval_iterator(config, batch_size=4, process_count=1))
  assert len(batches) == 2 and sum(int(b["mask"].sum()) for b in batches) == 6
  assert batches[0]["image_int"].shape == (4, 64, 64, 3)
  batch = next(datasets.get_train_iterator(config, batch_size=4, process_count=1))
  assert batch["image"].shape == (4, 64, 64, 3)


def test_mnist_without_local_files_uses_download(mnist_source, tmp_path, monkeypatch):
  """No local copy: the builder fetches the four files through the tfds download manager (a stand-in
  here, serving copies under hashed names as the real one does) and verifies them the same way; the
  pipeline's first-use step reports a failed download clearly."""
  served = tmp_path / "served"
  served.mkdir()
  requested = []

  class FakeDownloadManager:
    download_dir = tmp_path / "downloads"

    def download(self, urls):
      out = {}
      for key, url in urls.items():
        requested.append(url)
        target = served / f"{abs(hash(url))}_download"
        shutil.copyfile(os.path.join(mnist_source, os.path.basename(url)), target)
        out[key] = target
      return out

  builder = builders.LocalMNIST(data_dir=str(tmp_path / "tfds"), source_dir=None)
  gens = builder._split_generators(FakeDownloadManager())  # pylint: disable=protected-access
  assert sorted(os.path.basename(u) for u in requested) == sorted(f + ".gz" for f in builders.MNIST_SHA256)
  assert all(u.startswith(builders.MNIST_URL) for u in requested)
  key, example = next(gens["test"])
  imgs, labels = idx_arrays(mnist_source, "test")
  assert key == 0 and example["label"] == labels[0]
  from PIL import Image  # pylint: disable=import-outside-toplevel
  import io  # pylint: disable=import-outside-toplevel
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(example["image"]))), imgs[0])

  def failing_download(self, urls):  # pylint: disable=unused-argument
    raise ConnectionError("no network")

  monkeypatch.setattr(tfds.download.DownloadManager, "download", failing_download)
  monkeypatch.setattr(builders, "default_mnist_source_dir", lambda: None)
  monkeypatch.setattr(images, "default_mnist_source_dir", lambda: None)
  with pytest.raises(datasets.DataError, match="downloading them failed.*no network.*prepare_data.py"):
    datasets.get_train_iterator(mnist_config_for(str(tmp_path / "tfds2")), process_count=1)


def test_png_encoder_and_decoder_round_trip():
  """builders.png_bytes writes PNGs Pillow reads exactly; images.decode_image reads ours (fast path) and
  Pillow's (filtered rows, fallback) exactly."""
  import io  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(1)
  for shape in [(28, 28, 1), (32, 17, 3), (5, 9, 4)]:
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    ours = builders.png_bytes(a)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(ours))).reshape(shape), a)
    np.testing.assert_array_equal(images.decode_image(ours).reshape(shape), a)
    buf = io.BytesIO()
    Image.fromarray(a[..., 0] if shape[-1] == 1 else a).save(buf, format="png")
    np.testing.assert_array_equal(images.decode_image(buf.getvalue()).reshape(shape), a)


def test_prefetch_overlaps_loading_with_compute():
  """Batches are produced in background threads while the consumer works (sleep-based, load-tolerant)."""
  import time  # pylint: disable=import-outside-toplevel
  seq = iterators._BatchSequence(lambda s: (time.sleep(0.05), s)[1], 1 << 62)  # pylint: disable=protected-access
  it = iterators._grain_iter(seq, num_threads=2, prefetch=4)  # pylint: disable=protected-access
  assert next(it) == 0
  start = time.time()
  got = []
  for _ in range(20):
    got.append(next(it))
    time.sleep(0.05)  # "train step"
  assert got == list(range(1, 21))
  assert time.time() - start < 1.6  # serial would take 2.0 s
