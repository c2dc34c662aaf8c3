"""Image score networks at tiny width: every architecture switch compiles, keeps shapes and has finite
gradients; the PyTorch naming is the official one for every switch (checked against an independent
re-statement of the official module list) and conversion round-trips; bf16 stays close to float32;
remat changes nothing but memory; paper configs have the official parameter counts; bad input raises."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde_jax import image_configs
from score_sde_jax.models import convert_torch_state_dict, export_torch_state_dict, get_model
from score_sde_jax.models import convert as convert_lib
from score_sde_jax.run import config_utils

from tiers import default_or_slow  # tests/tiers.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B = 2


def load_config_file(rel):
  return config_utils.load_config_file(os.path.join(REPO, rel))


# ------------------------------------------------------------------------------------------------
# tiny configs
# ------------------------------------------------------------------------------------------------
def tiny_ncsnpp(**kw):
  sde = kw.pop("sde", "vesde")
  c = image_configs.ncsnpp(image_configs.cifar10_config(), sde, continuous=True)
  m = c.model
  m.nf = 8
  m.ch_mult = (1, 2)
  m.num_res_blocks = 1
  m.attn_resolutions = (4,)
  c.data.image_size = 8
  for k, v in kw.items():
    if k in ("centered",):
      c.data[k] = v
    elif k == "continuous":
      c.training.continuous = v
    else:
      m[k] = v
  return c


NCSNPP_SWITCHES = {
    # NCSN++ as in the paper (FIR, BigGAN, residual input pyramid, Fourier, scale_by_sigma), with remat
    "ncsnpp_remat": dict(remat=True),
    # no FIR, DDPM blocks, output_skip / input_skip pyramids combined by 'cat', positional, no noise
    # conditioning
    "ddpm_blocks_outskip_inskip_cat": dict(fir=False, resblock_type="ddpm", progressive="output_skip",
                                           progressive_input="input_skip", progressive_combine="cat",
                                           embedding_type="positional", scale_by_sigma=False,
                                           conditional=False),
    # FIR convolutions inside the re-samplers (fused up/down conv), residual output pyramid
    "fir_ddpm_blocks_residual_inskip": dict(resblock_type="ddpm", progressive="residual",
                                            progressive_input="input_skip", progressive_combine="sum"),
    # DDPM++-like (no FIR, BigGAN) with residual pyramids, 'cat', no skip rescale, class-conditional
    "nofir_residual_residual_cat_classes": dict(sde="vpsde", fir=False, progressive="residual",
                                                progressive_input="residual", progressive_combine="cat",
                                                skip_rescale=False, embedding_type="positional",
                                                scale_by_sigma=False, num_classes=3),
    # FIR output_skip / input_skip 'cat', positional embedding with scale_by_sigma (σ by index),
    # class labels without noise conditioning
    "fir_outskip_inskip_cat_positional_sbs_classes": dict(progressive="output_skip",
                                                          progressive_input="input_skip",
                                                          progressive_combine="cat",
                                                          embedding_type="positional",
                                                          scale_by_sigma=True, num_classes=3,
                                                          conditional=False),
    # deeper (2 blocks per level), attention at two resolutions, no conv re-sampling, no FIR
    "deep_noresampconv_noskiprescale": dict(num_res_blocks=2, resamp_with_conv=False, skip_rescale=False,
                                            resblock_type="ddpm", fir=False, init_scale=0.5,
                                            attn_resolutions=(8, 4)),
    # FIR filters without convolution in the DDPM-block re-samplers
    "fir_ddpm_blocks_no_conv_resample": dict(resblock_type="ddpm", resamp_with_conv=False,
                                             progressive="output_skip"),
}


def tiny_ddpm(**kw):
  c = image_configs.ddpm(image_configs.cifar10_config(), "vpsde", continuous=False)
  m = c.model
  m.nf = 32
  m.ch_mult = (1, 2)
  m.num_res_blocks = 1
  m.attn_resolutions = (4,)
  c.data.image_size = 8
  for k, v in kw.items():
    m[k] = v
  return c


def tiny_ncsnv2(name, **kw):
  c = image_configs.cifar10_config()
  if name == "ncsn":
    image_configs.ncsn(c)
  else:
    image_configs.ncsnv2(c, num_scales=10)
    c.model.name = name
  c.model.nf = 8
  c.model.num_scales = 10
  c.data.image_size = 16
  for k, v in kw.items():
    c.model[k] = v
  return c


def make_inputs(config, key=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(key), 3)
  size, ch = int(config.data.image_size), int(config.data.num_channels)
  x = jax.random.uniform(k1, (B, size, size, ch))
  name = config.model.name
  if name in ("ncsn", "ncsnv2_64", "ncsnv2_128", "ncsnv2_256", "ddpm") or not config.training.continuous:
    labels = jax.random.randint(k2, (B,), 0, int(config.model.num_scales))
  elif config.model.embedding_type == "fourier":
    labels = jnp.exp(jax.random.uniform(k2, (B,), minval=np.log(0.01), maxval=np.log(50.0)))
  else:
    labels = jax.random.uniform(k2, (B,)) * 999.0
  kwargs = {}
  if int(config.model.get("num_classes", 0) or 0) > 0:
    kwargs["class_labels"] = jax.random.randint(k3, (B,), 0, int(config.model.num_classes))
  return x, labels, kwargs


# XLA's CPU backend compiles these conv nets ~2.5x faster without LLVM optimisation.
cjit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def init_variables(model, x, labels, kwargs, seed=0):
  """Random variables with the model's shapes (numpy; compiling `init` costs ~20 s on CPU)."""
  shapes = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, x, labels, **kwargs))
  rng = np.random.default_rng(seed)

  def make(path, s):
    name = str(path[-1].key) if hasattr(path[-1], "key") else str(path[-1])
    if name in ("kernel", "W") and len(s.shape) >= 2:
      a = rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))
    elif name in ("scale", "gamma", "alpha"):
      a = 1.0 + 0.05 * rng.standard_normal(s.shape)
    elif name in ("embedding", "W"):
      a = rng.standard_normal(s.shape)
    else:
      a = 0.05 * rng.standard_normal(s.shape)
    return jnp.asarray(a, jnp.float32)

  return jax.tree_util.tree_map_with_path(make, shapes)


def check_train_step(config):
  """One compiled program: train-mode forward (dropout on) and parameter gradients."""
  model = get_model(config)
  x, labels, kwargs = make_inputs(config)
  variables = init_variables(model, x, labels, kwargs)

  @cjit
  def loss_and_grad(params, x, labels, kwargs):
    def loss(p):
      out = model.apply({"params": p}, x, labels, train=True, rngs={"dropout": jax.random.PRNGKey(3)},
                        **kwargs)
      return jnp.mean(out ** 2), out
    return jax.value_and_grad(loss, has_aux=True)(params)

  (value, out), grads = loss_and_grad(variables["params"], x, labels, kwargs)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert np.isfinite(float(value))
  g = jax.tree.leaves(grads)
  assert all(bool(jnp.all(jnp.isfinite(a))) for a in g)
  assert sum(float(jnp.sum(jnp.abs(a))) for a in g) > 0
  return model, variables, (x, labels, kwargs)


def check_round_trip(config, variables):
  sd = export_torch_state_dict(config, variables)
  back = convert_torch_state_dict(config, sd)
  same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), variables, back)
  assert jax.tree.all(same)
  assert jax.tree.structure(back) == jax.tree.structure(variables)
  return sd


# ------------------------------------------------------------------------------------------------
# An independent statement of the official PyTorch NCSN++ module list (score_sde_pytorch
# models/ncsnpp.py __init__): the state-dict names and shapes it creates for a config.
# ------------------------------------------------------------------------------------------------
def official_ncsnpp_state_shapes(config):
  m = config.model
  nf = m.nf
  ch_mult = m.ch_mult
  nrb = m.num_res_blocks
  num_resolutions = len(ch_mult)
  all_res = [config.data.image_size // (2 ** i) for i in range(num_resolutions)]
  channels = config.data.num_channels
  out = {}
  idx = [0]

  def add(names_shapes):
    for n, s in names_shapes:
      out[f"all_modules.{idx[0]}.{n}" if n else f"all_modules.{idx[0]}"] = tuple(s)
    idx[0] += 1

  def gn(c, prefix=""):
    return [(prefix + "weight", (c,)), (prefix + "bias", (c,))]

  def conv(o, i, k, prefix=""):
    return [(prefix + "weight", (o, i, k, k)), (prefix + "bias", (o,))]

  def resblock(in_ch, out_ch=None, up=False, down=False):
    out_ch = out_ch or in_ch
    p = (gn(in_ch, "GroupNorm_0.") + conv(out_ch, in_ch, 3, "Conv_0.") +
         [("Dense_0.weight", (out_ch, 4 * nf)), ("Dense_0.bias", (out_ch,))] +
         gn(out_ch, "GroupNorm_1.") + conv(out_ch, out_ch, 3, "Conv_1."))
    if m.resblock_type == "biggan":
      if in_ch != out_ch or up or down:
        p += conv(out_ch, in_ch, 1, "Conv_2.")
    elif in_ch != out_ch:
      p += [("NIN_0.W", (in_ch, out_ch)), ("NIN_0.b", (out_ch,))]
    add(p)

  def attn(c):
    p = gn(c, "GroupNorm_0.")
    for i in range(4):
      p += [(f"NIN_{i}.W", (c, c)), (f"NIN_{i}.b", (c,))]
    add(p)

  def resample(in_ch, out_ch, with_conv):
    out_ch = out_ch or in_ch
    if not with_conv:
      add([])
    elif m.fir:
      add(conv(out_ch, in_ch, 3, "Conv2d_0."))
    else:
      add(conv(out_ch, in_ch, 3, "Conv_0."))

  def top_conv(o, i):
    add([("weight", (o, i, 3, 3)), ("bias", (o,))])

  def top_gn(c):
    add([("weight", (c,)), ("bias", (c,))])

  if m.embedding_type == "fourier":
    add([("W", (nf,))])
    embed_dim = 2 * nf
  else:
    embed_dim = nf
  if m.conditional:
    add([("weight", (4 * nf, embed_dim)), ("bias", (4 * nf,))])
    add([("weight", (4 * nf, 4 * nf)), ("bias", (4 * nf,))])
  input_pyramid_ch = channels
  top_conv(nf, channels)
  hs_c = [nf]
  in_ch = nf
  for i_level in range(num_resolutions):
    for _ in range(nrb):
      out_ch = nf * ch_mult[i_level]
      resblock(in_ch, out_ch)
      in_ch = out_ch
      if all_res[i_level] in m.attn_resolutions:
        attn(in_ch)
      hs_c.append(in_ch)
    if i_level != num_resolutions - 1:
      if m.resblock_type == "ddpm":
        resample(in_ch, None, m.resamp_with_conv)
      else:
        resblock(in_ch, down=True)
      if m.progressive_input == "input_skip":
        # self.pyramid_downsample: an attribute, not an entry of all_modules; Combine's conv is Conv_0
        add(conv(in_ch, input_pyramid_ch, 1, "Conv_0."))
        if m.progressive_combine == "cat":
          in_ch *= 2
      elif m.progressive_input == "residual":
        resample(input_pyramid_ch, in_ch, True)
        input_pyramid_ch = in_ch
      hs_c.append(in_ch)
  in_ch = hs_c[-1]
  resblock(in_ch)
  attn(in_ch)
  resblock(in_ch)
  pyramid_ch = 0
  for i_level in reversed(range(num_resolutions)):
    for _ in range(nrb + 1):
      out_ch = nf * ch_mult[i_level]
      resblock(in_ch + hs_c.pop(), out_ch)
      in_ch = out_ch
    if all_res[i_level] in m.attn_resolutions:
      attn(in_ch)
    if m.progressive != "none":
      if i_level == num_resolutions - 1:
        if m.progressive == "output_skip":
          top_gn(in_ch)
          top_conv(channels, in_ch)
          pyramid_ch = channels
        else:
          top_gn(in_ch)
          top_conv(in_ch, in_ch)
          pyramid_ch = in_ch
      else:
        if m.progressive == "output_skip":
          # self.pyramid_upsample: an attribute, not an entry of all_modules
          top_gn(in_ch)
          top_conv(channels, in_ch)
          pyramid_ch = channels
        else:
          resample(pyramid_ch, in_ch, True)
          pyramid_ch = in_ch
    if i_level != 0:
      if m.resblock_type == "ddpm":
        resample(in_ch, None, m.resamp_with_conv)
      else:
        resblock(in_ch, up=True)
  assert not hs_c
  if m.progressive != "output_skip":
    top_gn(in_ch)
    top_conv(channels, in_ch)
  if not m.conditional and not m.get("num_classes", 0):
    # PyTorch blocks always create Dense_0; without any embedding the official JAX ones (ours) don't.
    out = {k: v for k, v in out.items() if ".Dense_0." not in k}
  return out


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------
# The switch sets whose train step is compiled in the default run: together they take every value of every
# switch above except the output_skip/input_skip pyramids, which `ddpm_blocks_outskip_inskip_cat` adds (each
# compile costs ~3-5 s on 2 cores; the other three, which combine values already covered, run with -m slow).
# Every set's forward pass is also checked against the official code by tests/test_official_fixtures.py.
TRAIN_STEP_BY_DEFAULT = ("ncsnpp_remat", "nofir_residual_residual_cat_classes",
                         "deep_noresampconv_noskiprescale", "ddpm_blocks_outskip_inskip_cat")


@pytest.mark.parametrize("switch", sorted(NCSNPP_SWITCHES))
def test_ncsnpp_switch_names(switch):
  """Every switch set: the PyTorch names and shapes are the official module list's, and conversion
  round-trips exactly."""
  config = tiny_ncsnpp(**NCSNPP_SWITCHES[switch])
  model = get_model(config)
  x, labels, kwargs = make_inputs(config)
  sd = check_round_trip(config, init_variables(model, x, labels, kwargs))
  expected = official_ncsnpp_state_shapes(config)
  ours = {k: tuple(v.shape) for k, v in sd.items() if k != "class_embed.weight"}
  assert ours == expected


@pytest.mark.parametrize("switch", default_or_slow(sorted(NCSNPP_SWITCHES), TRAIN_STEP_BY_DEFAULT))
def test_ncsnpp_switch_trains(switch):
  """The train-mode forward (dropout on) keeps shapes and has finite, non-zero parameter gradients."""
  check_train_step(tiny_ncsnpp(**NCSNPP_SWITCHES[switch]))


def test_official_initialisation():
  """`init` follows the official initialisers: zero biases, unit GroupNorm scales, ~0 output layers
  (init_scale 0 → 1e-10), Fourier features fixed at N(0, fourier_scale²)."""
  config = tiny_ncsnpp()
  model = get_model(config)
  x, labels, kw = make_inputs(config)
  v = cjit(lambda x, y: model.init({"params": jax.random.PRNGKey(0)}, x, y))(x, labels)["params"]
  assert jax.tree.structure(v) == jax.tree.structure(init_variables(model, x, labels, kw)["params"])
  assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(v))
  block = v["ResnetBlockBigGANpp_0"]
  np.testing.assert_array_equal(block["Conv_0"]["bias"], 0.0)
  np.testing.assert_array_equal(block["GroupNorm_0"]["scale"], 1.0)
  assert float(jnp.max(jnp.abs(block["Conv_1"]["kernel"]))) < 1e-4          # init_scale = 0
  assert 0.05 < float(jnp.std(block["Conv_0"]["kernel"])) < 1.0
  assert float(jnp.max(jnp.abs(v["AttnBlockpp_0"]["NIN_3"]["W"]))) < 1e-4
  assert float(jnp.std(v["GaussianFourierProjection_0"]["W"])) > 4.0       # scale 16


def test_remat_keeps_names_and_values():
  config = tiny_ncsnpp()
  model = get_model(config)
  x, labels, kw = make_inputs(config)
  variables = init_variables(model, x, labels, kw)
  remat_config = tiny_ncsnpp(remat=True)
  remat_model = get_model(remat_config)
  f = cjit(lambda v, x, y: model.apply(v, x, y))
  g = cjit(lambda v, x, y: remat_model.apply(v, x, y))
  np.testing.assert_allclose(f(variables, x, labels), g(variables, x, labels), rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training():
  config = tiny_ncsnpp(sde="vpsde", fir=False, progressive_input="none", embedding_type="positional",
                       scale_by_sigma=False, dropout=0.5)
  model = get_model(config)
  x, labels, kw = make_inputs(config)
  variables = init_variables(model, x, labels, kw)
  f = cjit(lambda v, x, y, k: model.apply(v, x, y, train=True, rngs={"dropout": k}))
  a = f(variables, x, labels, jax.random.PRNGKey(0))
  b = f(variables, x, labels, jax.random.PRNGKey(0))
  c = f(variables, x, labels, jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a, b)
  assert float(jnp.max(jnp.abs(a - c))) > 0
  e1 = cjit(lambda v, x, y: model.apply(v, x, y, train=False))(variables, x, labels)
  assert float(jnp.max(jnp.abs(a - e1))) > 0


def test_class_labels_change_the_output():
  config = tiny_ncsnpp(num_classes=3)
  model = get_model(config)
  x, labels, kw = make_inputs(config)
  variables = init_variables(model, x, labels, kw)
  f = cjit(lambda v, x, y, c: model.apply(v, x, y, class_labels=c))
  a = f(variables, x, labels, jnp.array([0, 1]))
  b = f(variables, x, labels, jnp.array([2, 1]))
  assert float(jnp.max(jnp.abs(a[0] - b[0]))) > 0
  np.testing.assert_allclose(a[1], b[1], rtol=1e-6)
  with pytest.raises(ValueError, match="class_labels"):
    model.apply(variables, x, labels)


@pytest.mark.parametrize("kw", [dict(), dict(num_classes=4, conditional=False)],
                         ids=["ddpm", "ddpm_class_conditional"])
def test_ddpm(kw):
  config = tiny_ddpm(**kw)
  model, variables, _ = check_train_step(config)
  check_round_trip(config, variables)


# ncsnv2_128/256 add refinement levels of the same blocks as ncsnv2_64 (their forward passes are checked
# against the official JAX maths by the jaxsem fixtures); their train-step compiles run with -m slow.
@pytest.mark.parametrize("name", default_or_slow(["ncsn", "ncsnv2_64", "ncsnv2_128", "ncsnv2_256"],
                                                ("ncsn", "ncsnv2_64")))
def test_ncsnv2_family(name):
  config = tiny_ncsnv2(name)
  model, variables, _ = check_train_step(config)
  sd = check_round_trip(config, variables)
  assert "begin_conv.weight" in sd and "refine1.crp.convs.0.weight" in sd
  assert any(k.startswith("res2.0.conv2.conv.") for k in sd)   # ConvMeanPool → PyTorch 'conv2.conv'
  if name == "ncsn":
    assert sd["normalizer.embed.weight"].shape == (10, 3 * 8)


def test_ncsnv2_scale_by_sigma():
  config = tiny_ncsnv2("ncsnv2_64")
  model = get_model(config)
  x, labels, kw = make_inputs(config)
  variables = init_variables(model, x, labels, kw)
  c2 = tiny_ncsnv2("ncsnv2_64", scale_by_sigma=False)
  a = model.apply(variables, x, labels)
  b = get_model(c2).apply(variables, x, labels)
  sig = np.exp(np.linspace(np.log(50.0), np.log(0.01), 10))[np.asarray(labels)]
  np.testing.assert_allclose(np.asarray(a) * sig[:, None, None, None], b, rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("which", ["ncsnpp", "ddpm"])
def test_bfloat16_close_to_float32(which):
  config = tiny_ncsnpp() if which == "ncsnpp" else tiny_ddpm()
  model = get_model(config)
  x, labels, kw = make_inputs(config)
  # the official initialisation (realistic activation scales)
  variables = cjit(lambda x, y: model.init(jax.random.PRNGKey(0), x, y))(x, labels)
  bf_config = tiny_ncsnpp(dtype="bfloat16") if which == "ncsnpp" else tiny_ddpm(dtype="bfloat16")
  bf_model = get_model(bf_config)
  a = cjit(lambda v, x, y: model.apply(v, x, y))(variables, x, labels)
  b = cjit(lambda v, x, y: bf_model.apply(v, x, y))(variables, x, labels)
  assert b.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(
      jax.eval_shape(lambda: bf_model.init(jax.random.PRNGKey(0), x, labels))))
  rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
  assert rel < 1e-2, rel


def test_mnist_configs_fit_28px():
  """The MNIST configs take 28x28x1 images (28 → 14 → 7) and stay under 10M parameters; a narrow copy
  runs forward and backward."""
  for sde in ("ve", "vp", "subvp"):
    config = load_config_file(f"configs/mnist/{sde}.py")
    assert config.data.dataset == "MNIST" and config.data.image_size == 28
    assert config.data.num_channels == 1
    assert "likelihood_weighting" in config.training and "importance_sampling" in config.training
    model = get_model(config)
    x, labels, kw = make_inputs(config)
    # one trace gives both the output and the parameters (init runs the forward pass)
    out, shapes = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), x, labels, **kw))
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))
    assert n < 10_000_000, n
    assert out.shape == x.shape
  config = load_config_file("configs/mnist/ve.py")
  config.model.nf = 8
  check_train_step(config)


@pytest.mark.parametrize("rel, expected", [
    ("configs/vp/cifar10_ddpmpp_continuous.py", 61_804_419),
    ("configs/ve/cifar10_ncsnpp_continuous.py", 62_758_915),
    ("configs/subvp/cifar10_ddpmpp_deep_continuous.py", 106_632_579),
])
def test_paper_parameter_counts(rel, expected):
  config = load_config_file(rel)
  model = get_model(config)
  x, labels, kw = make_inputs(config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, labels, **kw))
  assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes)) == expected


def test_paper_config_values():
  ve = load_config_file("configs/ve/cifar10_ncsnpp_continuous.py")
  vp = load_config_file("configs/vp/cifar10_ddpmpp_continuous.py")
  deep = load_config_file("configs/subvp/cifar10_ddpmpp_deep_continuous.py")
  for c in (ve, vp, deep):
    assert c.training.batch_size == 128 and c.optim.lr == 2e-4 and c.optim.warmup == 5000
    assert c.optim.grad_clip == 1.0 and c.model.dropout == 0.1
    assert c.model.beta_min == 0.1 and c.model.beta_max == 20.0
  assert ve.model.ema_rate == 0.999 and vp.model.ema_rate == 0.9999 and deep.model.ema_rate == 0.9999
  assert ve.model.sigma_min == 0.01 and ve.model.sigma_max == 50.0
  assert ve.training.n_iters == 1300001 and deep.training.n_iters == 950001
  assert ve.training.sde == "vesde" and vp.training.sde == "vpsde" and deep.training.sde == "subvpsde"
  assert ve.model.fir and ve.model.progressive_input == "residual" and ve.model.scale_by_sigma
  assert not vp.model.fir and vp.model.embedding_type == "positional" and vp.data.centered


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def test_unknown_model_name():
  config = tiny_ncsnpp()
  config.model.name = "unet_of_dreams"
  with pytest.raises(ValueError, match="unet_of_dreams"):
    get_model(config)


def test_image_size_not_divisible():
  config = tiny_ncsnpp()
  config.model.ch_mult = (1, 2, 2, 2)
  config.data.image_size = 12
  model = get_model(config)
  x = jnp.zeros((1, 12, 12, 3))
  with pytest.raises(ValueError, match="not divisible"):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, jnp.ones((1,))))


def test_mismatched_channels_and_size():
  config = tiny_ncsnpp()
  model = get_model(config)
  with pytest.raises(ValueError, match="channels"):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.ones((1,))))
  with pytest.raises(ValueError, match="image_size"):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), jnp.ones((1,))))
  ddpm_config = tiny_ddpm(nf=16)
  with pytest.raises(ValueError, match="multiple of 32"):
    jax.eval_shape(lambda: get_model(ddpm_config).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)),
                                                       jnp.ones((1,), jnp.int32)))


def test_unknown_switch_values():
  for field, value in [("progressive", "sideways"), ("progressive_input", "bogus"),
                       ("resblock_type", "resnext"), ("embedding_type", "learned"),
                       ("progressive_combine", "mul"), ("nonlinearity", "gelu2"), ("dtype", "int8")]:
    config = tiny_ncsnpp(**{field: value})
    with pytest.raises(ValueError, match=field.split("_")[0]):
      jax.eval_shape(lambda: get_model(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)),
                                                    jnp.ones((1,))))


def test_fourier_needs_continuous():
  config = tiny_ncsnpp(continuous=False)
  with pytest.raises(ValueError, match="continuous"):
    jax.eval_shape(lambda: get_model(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)),
                                                  jnp.ones((1,))))


def test_ncsnv2_has_no_class_conditional_variant():
  config = tiny_ncsnv2("ncsnv2_64", num_classes=3)
  with pytest.raises(ValueError, match="class-conditional"):
    jax.eval_shape(lambda: get_model(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)),
                                                  jnp.zeros((1,), jnp.int32)))


def test_converter_unknown_family():
  config = tiny_ncsnpp()
  config.model.name = "mlp"
  with pytest.raises(ValueError, match="no PyTorch conversion"):
    convert_lib.torch_name_map(config)


def test_toy_mlp_on_discrete_ve_is_finite_and_looks_sigma_up():
  """Discrete VE (SMLD) labels are ladder indices with 0 = σ_max: the MLP looks σ_i up (before: log(0) =
  −inf at i = 0, NaN scores).  Checked: the discrete model at index i is the continuous model at σ_i (same
  weights, to float32 round-off), scores finite at t = T, the SMLD loss and a PC sample finite."""
  from score_sde_jax import config_defaults, losses, models, sampling
  from score_sde_jax import sde as sde_lib
  from score_sde_jax.run import state as state_lib
  c = config_defaults.toy_config("vesde", "mixture1d")
  c.model.nf, c.model.num_layers, c.model.num_scales = 16, 1, 20
  c.training.continuous = False
  sde = sde_lib.sde_from_config(c)
  model = models.get_model(c)
  rng = np.random.default_rng()
  key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
  variables = state_lib.init_variables(c, model, key, (1, 1))
  x = jnp.asarray(rng.normal(size=(20, 1)) * 3, jnp.float32)
  t = jnp.linspace(sde.T, 1e-3, 20)       # every ladder index, 0 (σ_max) included
  disc = models.get_score_fn(sde, model, variables, continuous=False)(x, t)
  assert np.all(np.isfinite(np.asarray(disc)))
  c_cont = config_defaults.toy_config("vesde", "mixture1d")
  c_cont.model.nf, c_cont.model.num_layers, c_cont.model.num_scales = 16, 1, 20
  idx = np.round((sde.T - np.asarray(t)) * (sde.N - 1) / sde.T).astype(int)
  sigma_i = jnp.asarray(np.asarray(sde.discrete_sigmas)[::-1][idx].copy())
  cont_fn = models.get_model_fn(models.get_model(c_cont), variables)
  np.testing.assert_allclose(np.asarray(disc), np.asarray(cont_fn(x, sigma_i)), rtol=1e-5, atol=1e-5)
  loss = losses.smld_loss(jax.random.PRNGKey(1), models.get_model_fn(model, variables), x, sde)
  assert loss.shape == (20,) and np.all(np.isfinite(np.asarray(loss)))
  score_fn = models.get_score_fn(sde, model, variables, continuous=False)
  samples, _ = sampling.pc_sample(key, sde, score_fn, (16, 1), predictor="reverse_diffusion",
                                  corrector="langevin")
  assert np.all(np.isfinite(np.asarray(samples)))
