"""scripts/sample.py's controllable modes end to end (--class_label with --classifier or --cfg_weight,
--inpaint with --mask, --colorize), on tiny MNIST-shaped workdirs trained here for one step on
`tfds.testing.mock_data` (random 28x28 images, no files).  Untrained networks draw noise: what is checked
is what must hold for any weights — the known pixels of an inpainting are the input bit for bit, the
labels asked for are the ones used, the side-by-side grid has the documented layout, the NFE of the
configured sampler — and that bad flag combinations give one `ERROR:` line and exit 2.
"""
import importlib.util
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from score_sde_jax import conditional_draw, image_configs
from score_sde_jax import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(tfds_dir, **model):
  c = image_configs.mnist_config()
  c.seed = int(np.random.default_rng().integers(1 << 20))
  m = c.model
  m.name, m.nf, m.num_layers, m.num_scales = "mlp", 16, 1, 8
  m.embedding_type, m.scale_by_sigma = "positional", False
  for k, v in model.items():
    m[k] = v
  t = c.training
  t.sde, t.batch_size, t.n_iters, t.log_freq = "vpsde", 8, 1, 1
  t.snapshot_freq = t.snapshot_freq_for_preemption = 1
  t.snapshot_sampling = False
  c.eval.enable_loss = False
  c.data.centered = True
  c.data.tfds_data_dir = str(tfds_dir)
  c.sampling.predictor, c.sampling.corrector = "euler_maruyama", "none"
  return c


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
  base = tmp_path_factory.mktemp("controllable")
  work = {}
  with tfds.testing.mock_data(num_examples=16):
    kw = dict(devices=jax.devices()[:1], progress=False, report=lambda *_: None, async_checkpoint=False,
              handle_signals=False)
    work["score"] = str(base / "score")
    train_lib.train(_config(base / "tfds"), work["score"], **kw)
    c = _config(base / "tfds", num_classes=10)
    c.training.label_dropout = 0.2
    work["cond"] = str(base / "cond")
    train_lib.train(c, work["cond"], **kw)
    c = _config(base / "tfds", name="classifier_cnn", num_classes=10, nf=4)
    c.training.task = "noise_classifier"
    work["clf"] = str(base / "clf")
    train_lib.train(c, work["clf"], **kw)
  images = np.random.default_rng().random((5, 28, 28, 1)).astype(np.float32)
  np.savez(base / "digits.npz", images=images)
  spec = importlib.util.spec_from_file_location("_ctl_sample", os.path.join(REPO, "scripts", "sample.py"))
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  return {"base": base, "work": work, "images": images, "script": script}


def sample(ctx, *args):
  try:
    code = ctx["script"].run(["scripts/sample.py", "--noprogress"] + list(args))
  except SystemExit as e:
    code = e.code
  return 0 if code is None else code


def test_inpainting_keeps_the_known_pixels_and_writes_input_mask_result(ctx, capsys):
  out = str(ctx["base"] / "inp.npz")
  assert sample(ctx, f"--workdir={ctx['work']['score']}", f"--inpaint={ctx['base'] / 'digits.npz'}",
                "--mask=half", f"--out={out}", "--batch_size=4") == 0
  with np.load(out) as f:
    x, mask, nfe = f["samples"], f["mask"], f["nfe"]
  assert x.shape == (5, 28, 28, 1) and np.all(np.isfinite(x))
  known = mask == 1
  assert known[:, :14].all() and not known[:, 14:].any()          # 'half': the upper half is known
  np.testing.assert_array_equal(x[known], ctx["images"][known])      # bit for bit
  assert not np.allclose(x[~known], ctx["images"][~known], atol=1e-2)
  assert list(nfe) == [8, 8]                                        # N = 8 predictor steps, no corrector
  grid = Image.open(out.replace(".npz", "_grid.png"))
  assert grid.size == (3 * 30 + 2, 5 * 30 + 2)                      # 3 columns (input | mask | result)
  assert "side by side" in capsys.readouterr().out


def test_classifier_guidance_draws_one_row_per_class(ctx):
  out = str(ctx["base"] / "cls.npz")
  assert sample(ctx, f"--workdir={ctx['work']['score']}", "--class_label=all",
                f"--classifier={ctx['work']['clf']}", "--guidance_scale=2", "--num_samples=20",
                f"--out={out}") == 0
  with np.load(out) as f:
    np.testing.assert_array_equal(f["labels"], np.repeat(np.arange(10), 2))
    assert f["samples"].shape == (20, 28, 28, 1) and np.all(np.isfinite(f["samples"]))
  assert Image.open(out.replace(".npz", "_grid.png")).size == (2 * 30 + 2, 10 * 30 + 2)


def test_classifier_free_guidance_weight_changes_the_samples_and_zero_is_the_conditional(ctx):
  outs = {}
  for w in ("0", "3"):
    outs[w] = str(ctx["base"] / f"cfg{w}.npz")
    assert sample(ctx, f"--workdir={ctx['work']['cond']}", "--class_label=7", f"--cfg_weight={w}",
                  "--num_samples=4", f"--out={outs[w]}") == 0
  a, b = (np.load(outs[w])["samples"] for w in ("0", "3"))
  assert np.all(np.isfinite(a)) and np.all(np.isfinite(b)) and not np.allclose(a, b)
  np.testing.assert_array_equal(np.load(outs["0"])["labels"], np.full(4, 7))


@pytest.mark.parametrize("args, message", [
    (["--class_label=3"], "needs --classifier"),
    (["--class_label=all", "--cfg_weight=1"], "needs a class-conditional model"),
    (["--class_label=12", "--classifier={clf}"], "is not a class"),
    (["--inpaint={digits}", "--colorize={digits}"], "cannot be combined"),
    (["--mask=half"], "goes with --inpaint"),
    (["--inpaint={digits}", "--mask=diagonal"], "neither a preset"),
    (["--inpaint=/nonexistent.npz"], "no such file"),
    (["--colorize={digits}"], "needs an RGB model"),
    (["--inpaint={digits}", "--set", "sampling.method=ddim"], "use the PC sampler"),
    (["--class_label=all", "--classifier={score}"], "not a noise-conditional classifier"),
])
def test_bad_controllable_flags_give_one_error_line(ctx, capsys, args, message):
  fill = {"clf": ctx["work"]["clf"], "digits": str(ctx["base"] / "digits.npz"), "score": ctx["work"]["score"]}
  args = [a.format(**fill) for a in args]
  assert sample(ctx, f"--workdir={ctx['work']['score']}", *args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("ERROR:") and message in err[0], err


def test_class_labels_and_masks():
  np.testing.assert_array_equal(conditional_draw.class_labels("all", 3, 6), [0, 0, 1, 1, 2, 2])
  with pytest.raises(ValueError, match="multiple of the 3 classes"):
    conditional_draw.class_labels("all", 3, 7)
  m = conditional_draw.make_mask("center", (2, 8, 8, 1), jax.random.PRNGKey(0))
  assert m[:, 2:6, 2:6].sum() == 0 and m.sum() == 2 * (64 - 16)
  r = conditional_draw.make_mask("random", (64, 8, 8, 3), jax.random.PRNGKey(np.random.default_rng().integers(99)))
  assert np.all(r[..., 0] == r[..., 2])                     # one mask per pixel, shared by the channels
  assert abs(r.mean() - 0.5) < 0.03                          # 4096 pixels: SE 0.008, 0.03 is 3.8 SE
