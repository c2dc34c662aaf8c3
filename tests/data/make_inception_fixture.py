"""Writes tests/data/inception_fixture.npz: pytorch-fid's FID Inception-v3 on random weights (needs torch and
pytorch-fid; the test that reads the fixture does not), and tests/data/torch_legacy_cases.pth (+ _expected.npz):
a small state dict saved by torch in its legacy (< 1.6, non-zip) format, the format of pytorch-fid's weights.

    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch pytorch-fid
    /tmp/torchenv/bin/python tests/data/make_inception_fixture.py [--only inception|legacy]

No network: the model is pytorch-fid's own `fid_inception_v3()` and `InceptionV3`, with its weight download
(`pytorch_fid.inception.load_state_dict_from_url`) replaced by a function that returns random weights.

The fixture holds only what the test needs to redo the comparison without torch:
- the recipe of the random weights (`seed`, `names`, `shapes`): `random_state_dict` below rebuilds the same
  float32 arrays in numpy alone, and `state_dict_sha256` checks it did;
- the input batches (`images_<i>`, uint8 NHWC; the network input is `u8 / 255` in float32), of sizes that
  exercise the resize: 32x32 and 64x48 (upsampling), 299x299 (identity), 320x310 (downsampling);
- pytorch-fid's outputs on them: `pool_3_<i>` (B, 2048) from `InceptionV3([3])` (resize, 2x - 1, blocks
  0-3) and `logits_<i>` (B, 1008) from the same network's `Inception3.forward` (eval: fc of the pool).
"""
import hashlib
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(REPO, "tests", "data", "inception_fixture.npz")
LEGACY_OUT = os.path.join(REPO, "tests", "data", "torch_legacy_cases.pth")
LEGACY_EXPECTED = os.path.join(REPO, "tests", "data", "torch_legacy_cases_expected.npz")
SEED = 20240517
IMAGE_SIZES = [(32, 32), (64, 48), (299, 299), (320, 310)]  # (H, W); 2 images per batch
BATCH = 2


def random_state_dict(names, shapes, seed):
  """The random FID-Inception weights, reproducible in numpy alone.

  One `np.random.default_rng(seed)` stream, drawn tensor by tensor in sorted-name order, each as
  float64 standard normals `z` of the tensor's shape, then cast to float32:
  conv/fc weight: z * sqrt(2 / fan_in) (He scale, so activations stay O(1) through 20 blocks);
  bn.weight: 1 + 0.1 z; bn.bias, bn.running_mean, fc.bias: 0.1 z; bn.running_var: exp(0.2 z) (positive).
  """
  rng = np.random.default_rng(seed)
  out = {}
  for name in sorted(names):
    shape = tuple(int(s) for s in shapes[name])
    z = rng.standard_normal(shape)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "weight" and len(shape) >= 2:
      w = z * np.sqrt(2.0 / int(np.prod(shape[1:])))
    elif leaf == "weight":
      w = 1.0 + 0.1 * z
    elif leaf in ("bias", "running_mean"):
      w = 0.1 * z
    elif leaf == "running_var":
      w = np.exp(0.2 * z)
    else:
      raise ValueError(f"no recipe for {name}")
    out[name] = w.astype(np.float32)
  return out


def state_dict_sha256(state_dict):
  h = hashlib.sha256()
  for name in sorted(state_dict):
    a = np.ascontiguousarray(state_dict[name], dtype="<f4")
    h.update(f"{name}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def random_images(seed):
  rng = np.random.default_rng(seed + 1)
  return [rng.integers(0, 256, size=(BATCH, h, w, 3), dtype=np.uint8) for h, w in IMAGE_SIZES]


def write_legacy_cases():
  """torch.save(..., _use_new_zipfile_serialization=False) of a BasicConv2d-like state dict (conv weight,
  BatchNorm buffers with num_batches_tracked and the state dict's _metadata), an nn.Linear's parameters,
  views sharing one storage (transposed, offset), float64, int32, bfloat16; expected values as torch
  converts them, keyed by name."""
  import collections

  import torch

  torch.manual_seed(0)
  conv = torch.nn.Conv2d(3, 4, 3, bias=False)
  bn = torch.nn.BatchNorm2d(4, eps=1e-3)
  bn.running_mean.uniform_(-1, 1)
  bn.running_var.uniform_(0.5, 2)
  bn.num_batches_tracked += 7
  block = torch.nn.Sequential(collections.OrderedDict(conv=conv, bn=bn))
  state = block.state_dict()  # OrderedDict with _metadata
  lin = torch.nn.Linear(5, 3)
  state["fc.weight"] = lin.weight  # an nn.Parameter
  state["fc.bias"] = lin.bias
  base = torch.randn(4, 6)
  state["base"] = base
  state["base_t"] = base.t()
  state["base_rows"] = base[1:3]
  state["f64"] = torch.randn(3, dtype=torch.float64)
  state["i32"] = torch.tensor([-7, 2**31 - 1], dtype=torch.int32)
  state["bf16"] = torch.tensor([1.0, -2.5, 3.140625], dtype=torch.bfloat16)
  torch.save(state, LEGACY_OUT, _use_new_zipfile_serialization=False)
  expected = {k: (v.detach().float() if v.dtype == torch.bfloat16 else v.detach()).numpy()
              for k, v in state.items()}
  np.savez(LEGACY_EXPECTED, **expected)
  with open(LEGACY_OUT, "rb") as f:
    assert f.read(4) == b"\x80\x02\x8a\x0a", "not the legacy format"
  print(f"wrote {LEGACY_OUT} ({os.path.getsize(LEGACY_OUT)} bytes) and {LEGACY_EXPECTED}")


def main():
  import argparse

  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", choices=["inception", "legacy"])
  only = parser.parse_args().only
  if only != "inception":
    write_legacy_cases()
  if only != "legacy":
    write_inception_fixture()


def write_inception_fixture():
  import torch
  import torch.nn.functional as F
  import torchvision
  from pytorch_fid import inception as pfi

  torch.manual_seed(0)
  # The network's names and shapes: pytorch-fid's fid_inception_v3() with the download replaced.
  shapes_holder = {}

  def fake_download(*args, **kwargs):
    return shapes_holder["state_dict"]

  pfi.load_state_dict_from_url = fake_download
  skeleton = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
  for attr, block in [("Mixed_5b", pfi.FIDInceptionA(192, pool_features=32)),
                      ("Mixed_5c", pfi.FIDInceptionA(256, pool_features=64)),
                      ("Mixed_5d", pfi.FIDInceptionA(288, pool_features=64)),
                      ("Mixed_6b", pfi.FIDInceptionC(768, channels_7x7=128)),
                      ("Mixed_6c", pfi.FIDInceptionC(768, channels_7x7=160)),
                      ("Mixed_6d", pfi.FIDInceptionC(768, channels_7x7=160)),
                      ("Mixed_6e", pfi.FIDInceptionC(768, channels_7x7=192)),
                      ("Mixed_7b", pfi.FIDInceptionE_1(1280)),
                      ("Mixed_7c", pfi.FIDInceptionE_2(2048))]:
    setattr(skeleton, attr, block)
  full_sd = skeleton.state_dict()
  float_names = sorted(n for n, t in full_sd.items() if t.is_floating_point())
  shapes = {n: list(full_sd[n].shape) for n in float_names}
  weights = random_state_dict(float_names, shapes, SEED)
  state_dict = {n: (torch.from_numpy(weights[n]) if n in weights else t.clone()) for n, t in full_sd.items()}
  shapes_holder["state_dict"] = state_dict

  # pytorch-fid's own classes, weights from fake_download (load_state_dict is strict).
  fid_model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
  classifier = pfi.fid_inception_v3().eval()
  # torchvision's plain Inception3 with the same weights: what the FID patches change (printed only).
  plain = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
  plain.load_state_dict(state_dict)
  plain.eval()

  images = random_images(SEED)
  arrays = {"seed": np.int64(SEED), "names": np.array(float_names), "shapes": np.array(json.dumps(shapes)),
            "state_dict_sha256": np.array(state_dict_sha256(weights)), "batch_count": np.int64(len(images))}
  with torch.no_grad():
    for i, u8 in enumerate(images):
      x = torch.from_numpy(u8.astype(np.float32) / np.float32(255.0)).permute(0, 3, 1, 2).contiguous()
      pool = fid_model(x)[0][:, :, 0, 0]
      # Inception3.forward's input: exactly InceptionV3's resize and scaling.
      x299 = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
      logits = classifier(x299)
      logits_from_pool = F.linear(pool, classifier.fc.weight, classifier.fc.bias)
      plain_logits = plain(x299)
      # float64 run of the same network: the float32 rounding floor of the comparison.
      classifier64 = classifier.double()
      logits64 = classifier64(x299.double())
      classifier.float()
      rel = lambda a, b: float((a - b).abs().max() / b.abs().max())
      print(f"batch {i} {tuple(u8.shape)}: pool_3 mean {pool.mean():.4f} std {pool.std():.4f} "
            f"frac>0 {(pool > 0).float().mean():.3f}; logits std {logits.std():.4f}; "
            f"fc(pool) vs forward {rel(logits_from_pool, logits):.1e}; float32 vs float64 logits "
            f"{rel(logits.double(), logits64):.1e}; plain torchvision vs FID logits "
            f"{rel(plain_logits, logits):.2f}")
      arrays[f"images_{i}"] = u8
      arrays[f"pool_3_{i}"] = pool.numpy().astype(np.float32)
      arrays[f"logits_{i}"] = logits.numpy().astype(np.float32)
  np.savez_compressed(OUT, **arrays)
  print(f"wrote {OUT} ({os.path.getsize(OUT) / 1e6:.2f} MB); torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, pytorch-fid {getattr(sys.modules.get('pytorch_fid'), '__version__', '?')}")


if __name__ == "__main__":
  main()
