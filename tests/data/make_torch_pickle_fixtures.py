"""Writes the torch_pickle test fixtures (needs torch; the tests do not).

    python tests/data/make_torch_pickle_fixtures.py   # with a Python that has torch and numpy

Outputs, beside this script:
- torch_pickle_cases.pth: a torch.save of views sharing one storage (transposed, offset, strided,
  expanded), every dtype with a typed storage (bfloat16 included), 0-d and empty tensors, nn.Parameters,
  a torch.Size, a numpy float64 scalar and an nn.Linear state dict.
- torch_pickle_cases_expected.npz: each tensor as torch itself converts it (`t.detach().numpy()`;
  bfloat16 through `.float()`), keyed by its path in the saved object with '/' between the parts.
"""
import collections
import os

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def make_cases():
  torch.manual_seed(0)
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6) * 0.5 - 3.0
  bf16 = torch.tensor([[1.0, -2.5, 3.140625], [1e-3, 65280.0, float("inf")]], dtype=torch.bfloat16)
  return collections.OrderedDict(
      base=base,
      transposed=base.t(),
      row_slice=base[1:3],
      col_slice=base[:, 1:6:2],
      expanded=base[2, 1:3].expand(3, 2),
      scalar=torch.tensor(2.5, dtype=torch.float64),
      empty=torch.zeros(0, 3),
      bf16=bf16,
      bf16_transposed=bf16.t(),
      f16=torch.tensor([0.5, -1.0, 65504.0], dtype=torch.float16),
      f64=torch.tensor([np.pi, -1e300], dtype=torch.float64),
      i64=torch.tensor([-(2**62), -1, 0, 2**40], dtype=torch.int64)[1:],
      i32=torch.tensor([-(2**31), 7], dtype=torch.int32),
      i16=torch.tensor([-300, 300], dtype=torch.int16),
      i8=torch.tensor([-128, 127], dtype=torch.int8),
      u8=torch.tensor([0, 255], dtype=torch.uint8),
      bool=torch.tensor([True, False, True]),
      c64=torch.tensor([1 + 2j, -3j], dtype=torch.complex64),
      param=torch.nn.Parameter(torch.randn(3, 2)),
      frozen=torch.nn.Parameter(torch.ones(2), requires_grad=False),
      size=torch.Size([2, 3]),
      nested={
          "list": [base[0], base[3, ::2]],
          "tuple": (1, "a", None, 2.5),
          "lr": np.float64(1e-4),
          "linear": torch.nn.Linear(3, 2).state_dict(),
      },
  )


def flatten(obj, prefix=""):
  if isinstance(obj, torch.Tensor):
    t = obj.detach()
    yield prefix, (t.float() if t.dtype == torch.bfloat16 else t).numpy()
  elif isinstance(obj, dict):
    for k, v in obj.items():
      yield from flatten(v, f"{prefix}/{k}" if prefix else str(k))
  elif isinstance(obj, list):
    for i, v in enumerate(obj):
      yield from flatten(v, f"{prefix}/{i}")


def main():
  cases = make_cases()
  torch.save(cases, os.path.join(HERE, "torch_pickle_cases.pth"))
  np.savez_compressed(os.path.join(HERE, "torch_pickle_cases_expected.npz"), **dict(flatten(cases)))
  print(f"wrote torch_pickle_cases.pth and torch_pickle_cases_expected.npz with torch {torch.__version__}")


if __name__ == "__main__":
  main()
