"""A few real MNIST training steps on CPU with a tiny model (the data comes from ../shared)."""
import functools
import os

import jax
import numpy as np
import pytest

from score_sde_jax import image_configs
from score_sde_jax import train as train_lib


def tiny_mnist_config(tfds_dir, sde="vpsde"):
  c = image_configs.mnist_ncsnpp(sde)
  m = c.model
  m.nf = 8
  m.ch_mult = (1,)
  m.num_res_blocks = 1
  m.attn_resolutions = ()
  m.num_scales = 20
  t = c.training
  t.batch_size = 8
  t.n_iters = 2
  t.log_freq = 1
  t.snapshot_freq = 100
  t.snapshot_freq_for_preemption = 1
  t.snapshot_sampling = False
  c.eval.enable_loss = False
  c.data.tfds_data_dir = str(tfds_dir)
  return c


def test_mnist_steps_checkpoint_and_resume(tmp_path, shared_dir, monkeypatch):
  src = os.path.join(shared_dir, "data", "mnist")
  if not os.path.isdir(src):
    pytest.skip(f"{src} is not present")
  monkeypatch.setenv("SCORE_SDE_MNIST_DIR", src)
  c = tiny_mnist_config(tmp_path / "tfds")
  work = str(tmp_path / "w")
  r = train_lib.train(c, work, devices=jax.devices()[:1], progress=False, keep_history=True,
                      report=lambda *_: None)
  assert r.step == 2 and len(r.history) == 2
  assert all(np.isfinite(h["loss"]) and h["loss"] > 0 for h in r.history)
  c.training.n_iters = 3
  r2 = train_lib.train(c, work, devices=jax.devices()[:1], progress=False, report=lambda *_: None)
  assert r2.resumed_from == 2 and r2.step == 3
  leaf = jax.tree_util.tree_leaves(r2.state.params)[0]
  assert leaf.dtype == np.float32


def test_bfloat16_compute_keeps_fp32_params_loss_and_optimiser(tmp_path):
  from score_sde_jax import models, sde as sde_lib
  c = tiny_mnist_config(tmp_path / "tfds")
  c.model.dtype = "bfloat16"
  model = models.get_model(c)
  sde = sde_lib.sde_from_config(c)
  # XLA's CPU backend compiles these conv nets ~2.5x faster without LLVM optimisation; dtypes and
  # finiteness, all this test checks, do not depend on it.
  cjit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
  state = cjit(lambda k: train_lib.create_train_state(c, model, k, (8, 28, 28, 1)))(jax.random.PRNGKey(0))
  step = cjit(train_lib.make_train_step(c, sde, model))
  x = np.random.RandomState(0).rand(8, 28, 28, 1).astype(np.float32)
  new, metrics = step(state, {"image": x})
  assert metrics["loss"].dtype == np.float32 and np.isfinite(float(metrics["loss"]))
  floats = [l for l in jax.tree_util.tree_leaves((new.params, new.ema_params, new.opt_state))
            if np.issubdtype(l.dtype, np.floating)]
  assert floats and all(l.dtype == np.float32 for l in floats)
