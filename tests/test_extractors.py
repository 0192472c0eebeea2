"""Inception (FID) and I3D (FVD) feature extractors (vdit/evaluators/extractors).

No reference weights exist here, so the networks get random variables (random BatchNorm
statistics too), exported in the reference PyTorch naming and layout and read back through the
public loaders. The torch layout is checked independently of the exporter by numpy
re-implementations of torch semantics (NCHW / NCDHW correlation, BatchNorm) on the file's arrays.
"""

import functools
import operator
import re

import jax
import numpy as np
import pytest

from vdit.evaluators import extractors, frechet
from vdit.evaluators.extractors import check, i3d, inception, torch_layout

NETS = {"inception": inception, "i3d": i3d}
RNG = np.random.default_rng(0)
VIDEOS = RNG.integers(0, 256, (3, 2, 24, 20, 3), dtype=np.uint8)  # [N, T, H, W, 3]


def random_variables(template: dict, seed: int) -> dict:
  """He-scaled kernels; BatchNorm γ, β, mean, var all random so a swap between them shows."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = path[-1].key
    if name == "kernel":
      fan_in = int(np.prod(x.shape[:-1]))
      return rng.normal(0, np.sqrt(2 / fan_in), x.shape).astype(np.float32)
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
    return rng.normal(0, 0.1, x.shape).astype(np.float32)  # bias, mean

  return jax.tree_util.tree_map_with_path(leaf, template)


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
  """{name: (variables, {".npz": path, ".safetensors": path})}."""
  out = {}
  for seed, (name, net) in enumerate(NETS.items()):
    variables = random_variables(net.template(), seed)
    arrays = net.export(variables)
    d = tmp_path_factory.mktemp(name)
    out[name] = (
      variables,
      {ext: torch_layout.write(arrays, str(d / f"w{ext}")) for ext in (".npz", ".safetensors")},
    )
  return out


# ---------------------------------------------------------------------------------------------
# Architecture: layer and parameter counts.
# ---------------------------------------------------------------------------------------------
def _counts(net) -> tuple[int, int]:
  leaves = jax.tree_util.tree_leaves_with_path(net.template()["params"])
  kernels = sum(path[-1].key == "kernel" for path, _ in leaves)
  return kernels, sum(int(np.prod(x.shape)) for _, x in leaves)


def test_inception_counts():
  # torchvision's Inception3 (same convolutions and widths as the FID graph) has 27,161,264
  # parameters (its ImageNet weights' `num_params`), including AuxLogits (1×1 768→128 conv +
  # BN, 5×5 128→768 conv + BN, 768→1000 fc) and the 2048→1000 fc; FID uses neither.
  aux = 768 * 128 + 2 * 128 + 128 * 768 * 25 + 2 * 768 + 768 * 1000 + 1000
  fc = 2048 * 1000 + 1000
  assert _counts(inception) == (94, 27_161_264 - aux - fc) == (94, 21_785_568)


def test_i3d_counts():
  def unit(c_in, c_out, k):  # conv k×k×k without bias + BatchNorm γ, β
    return k**3 * c_in * c_out + 2 * c_out

  n, c = unit(3, 64, 7) + unit(64, 64, 1) + unit(64, 192, 3), 192
  for w0, w1a, w1b, w2a, w2b, w3b in i3d.MIXED.values():
    n += unit(c, w0, 1) + unit(c, w1a, 1) + unit(w1a, w1b, 3) + unit(c, w2a, 1)
    n += unit(w2a, w2b, 3) + unit(c, w3b, 1)
    c = w0 + w1b + w2b + w3b
  assert c == 1024
  n += c * 400 + 400  # logits: 1×1×1 conv with bias
  assert _counts(i3d) == (3 + 6 * 9 + 1, n) == (58, 12_697_264)
  # The TF original (deepmind/kinetics-i3d) has BatchNorm without γ; OpenVINO's Open Model Zoo
  # card for it (i3d-rgb-tf) lists "MParams 12.69": ours less one γ per BatchNorm channel.
  leaves = jax.tree_util.tree_leaves_with_path(i3d.template()["params"])
  gammas = sum(x.size for path, x in leaves if path[-1].key == "scale")
  assert round((n - gammas) / 1e4) == 1269


# ---------------------------------------------------------------------------------------------
# Preprocessing and torch layout against numpy references.
# ---------------------------------------------------------------------------------------------
def _torch_bilinear(x: np.ndarray, size: int) -> np.ndarray:
  """torch F.interpolate(mode="bilinear", align_corners=False, antialias=False) on [H, W]."""
  for axis in (0, 1):
    n = x.shape[axis]
    src = np.maximum((np.arange(size) + 0.5) * n / size - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    lam = (src - i0).reshape((-1, 1) if axis == 0 else (1, -1))
    x = np.take(x, i0, axis) * (1 - lam) + np.take(x, i1, axis) * lam
  return x


@pytest.mark.parametrize("shape", [(24, 20), (331, 420)])  # up- and downsampling
def test_resize_is_torch_bilinear(shape):
  frame = RNG.integers(0, 256, (*shape, 3), dtype=np.uint8)
  got = np.asarray(extractors.resize_to_unit(frame, 299))
  want = np.stack([_torch_bilinear(frame[..., c] / 255.0, 299) for c in range(3)], -1) * 2 - 1
  # float32 sample positions and weights in jax vs float64 here; another grid (align_corners=True,
  # antialiasing, TF1's no-half-pixel resize) is off by > 1e-2 somewhere.
  np.testing.assert_allclose(got, want, atol=1e-4)


def _torch_conv_bn_relu(x, arrays, prefix, conv, strides, pads, eps=1e-3):
  """torch semantics: x [C, *S] (NC… without N), weight [O, I, *K], `pads` [(lo, hi)] per axis."""
  w = arrays[f"{prefix}.{conv}.weight"]
  x = np.pad(x, [(0, 0), *pads])
  out_shape = [(x.shape[1 + a] - w.shape[2 + a]) // strides[a] + 1 for a in range(len(strides))]
  y = np.zeros((w.shape[0], *out_shape))
  for offset in np.ndindex(*w.shape[2:]):
    idx = tuple(slice(o, o + (n - 1) * s + 1, s) for o, n, s in zip(offset, out_shape, strides))
    y += np.einsum("oi,i...->o...", w[(slice(None), slice(None), *offset)], x[(slice(None), *idx)])
  bn = lambda k: arrays[f"{prefix}.bn.{k}"].reshape(-1, *[1] * len(strides))
  y = (y - bn("running_mean")) / np.sqrt(bn("running_var") + eps) * bn("weight") + bn("bias")
  return np.maximum(y, 0)


def _same_pads(sizes, kernel, strides):
  """pytorch-i3d `compute_pad` (TF "SAME"): total k − s (or k − size % s), front total // 2."""
  pads = []
  for n, k, s in zip(sizes, kernel, strides):
    total = max(k - (s if n % s == 0 else n % s), 0)
    pads.append((total // 2, total - total // 2))
  return pads


def _sub(variables, *path):
  """The variables of the submodule at `path`."""
  return {c: functools.reduce(operator.getitem, path, variables[c]) for c in variables}


def test_inception_layout_matches_torch_semantics(nets):
  path = nets["inception"][1][".npz"]
  arrays, variables = torch_layout.read(path), inception.load(path)
  # Stem: 3×3 stride-2 valid conv on an input with H ≠ W (a kernel flipped or transposed in
  # space, or γ/β/mean/var mixed up, changes the output).
  x = RNG.normal(size=(3, 11, 9))
  want = _torch_conv_bn_relu(x, arrays, "Conv2d_1a_3x3", "conv", (2, 2), [(0, 0), (0, 0)])
  layer = inception.BasicConv(32, (3, 3), 2, "VALID")
  got = layer.apply(_sub(variables, "Conv2d_1a_3x3"), x.transpose(1, 2, 0)[None])[0]
  np.testing.assert_allclose(np.asarray(got).transpose(2, 0, 1), want, rtol=1e-4, atol=1e-4)
  # FIDInceptionA/C/E_1 average pools leave the padding out of the count (a constant stays).
  np.testing.assert_array_equal(inception._avg_pool_3x3(np.ones((1, 5, 4, 2))), 1.0)
  # A 1×7 kernel (torch padding (0, 3)).
  x = RNG.normal(size=(128, 4, 9))
  want = _torch_conv_bn_relu(x, arrays, "Mixed_6b.branch7x7_2", "conv", (1, 1), [(0, 0), (3, 3)])
  got = inception.BasicConv(128, (1, 7)).apply(
    _sub(variables, "Mixed_6b", "branch7x7_2"), x.transpose(1, 2, 0)[None]
  )[0]
  np.testing.assert_allclose(np.asarray(got).transpose(2, 0, 1), want, rtol=1e-4, atol=1e-4)


def test_i3d_layout_matches_torch_semantics(nets):
  path = nets["i3d"][1][".safetensors"]
  arrays, variables = torch_layout.read(path), i3d.load(path)
  x = RNG.normal(size=(3, 5, 9, 12))  # [C, T, H, W]: odd and even sizes, T ≠ H ≠ W
  pads = _same_pads(x.shape[1:], (7, 7, 7), (2, 2, 2))
  want = _torch_conv_bn_relu(x, arrays, "Conv3d_1a_7x7", "conv3d", (2, 2, 2), pads)
  layer = i3d.Unit3D(64, (7, 7, 7), (2, 2, 2))
  got = layer.apply(_sub(variables, "Conv3d_1a_7x7"), x.transpose(1, 2, 3, 0)[None])[0]
  np.testing.assert_allclose(np.asarray(got).transpose(3, 0, 1, 2), want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Public loaders and extractors: identical to the variables they were written from.
# ---------------------------------------------------------------------------------------------
def test_inception_extractor_round_trip_and_fd(nets):
  variables, paths = nets["inception"]
  n, t = VIDEOS.shape[:2]
  direct = np.asarray(inception.forward(variables, VIDEOS.reshape(n * t, *VIDEOS.shape[2:])))
  direct = direct.reshape(n, t, -1)
  for path in paths.values():
    feats = frechet.EXTRACTORS["inception"](weights=path)(VIDEOS)
    assert feats.shape == (3, inception.FEATURES) and np.std(feats) > 0
    np.testing.assert_array_equal(feats, direct.mean(1))
  middle = inception.extractor(weights=paths[".npz"], frames="middle", batch_size=2)(VIDEOS)
  np.testing.assert_allclose(middle, direct[:, t // 2], rtol=1e-5, atol=1e-6)
  assert frechet.frechet_of_features(feats, feats) == pytest.approx(0.0, abs=1e-6)
  assert frechet.frechet_of_features(feats, direct[:, 0]) > 1e-3


def test_frechet_from_samples_equals_covariance_form():
  # frechet_of_features takes the trace term from the samples when N < D (2048-d features).
  x = RNG.normal(size=(5, 64)) @ RNG.normal(size=(64, 64))
  y = RNG.normal(size=(7, 64)) * 2 + 1
  want = frechet.frechet_distance(*frechet.statistics(x), *frechet.statistics(y))
  assert frechet.frechet_of_features(x, y) == pytest.approx(want, rel=1e-7)


def test_i3d_extractor_round_trip_and_fd(nets):
  variables, paths = nets["i3d"]
  # 2 frames, padded to 9 by repeating the last one.
  padded = np.concatenate([VIDEOS, np.repeat(VIDEOS[:, -1:], 7, axis=1)], axis=1)
  direct = dict(zip(i3d.FEATURES, map(np.asarray, i3d.forward(variables, padded))))
  for (features, width), path in zip(
    [("logits", 400), ("pool", i3d.POOL_FEATURES)], paths.values()
  ):
    feats = frechet.EXTRACTORS["i3d"](weights=path, features=features)(VIDEOS)
    assert feats.shape == (3, width) and np.std(feats) > 0
    np.testing.assert_array_equal(feats, direct[features])
    assert frechet.frechet_of_features(feats, feats) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad files and options: errors that name the file, the key and the shapes.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
  "name,key,axes",
  [
    ("inception", "Mixed_6b.branch7x7_2.conv.weight", (2, 3)),  # a 1×7 kernel stored as 7×1
    ("i3d", "Mixed_4c.b1b.conv3d.weight", (0, 1)),  # [in, out] instead of [out, in]
  ],
)
def test_bad_files_are_clear_errors(nets, tmp_path, name, key, axes):
  net, path = NETS[name], nets[name][1][".npz"]
  arrays = torch_layout.read(path)
  # The exported file holds exactly the keys and torch shapes the network expects.
  want = torch_layout.expected_shapes(net.template())
  assert {k: v.shape for k, v in arrays.items()} == want
  assert check.check(name, path)["arrays"] == len(want)

  def load(changed):
    return net.load(torch_layout.write(changed, str(tmp_path / "bad.npz")))

  with pytest.raises(torch_layout.WeightsError, match=rf"bad.npz: missing '{key}'"):
    load({k: v for k, v in arrays.items() if k != key})
  swapped = np.swapaxes(arrays[key], *axes)
  shapes = f"'{key}' has shape {swapped.shape}, the .* network expects {arrays[key].shape}"
  with pytest.raises(torch_layout.WeightsError, match=re.escape(shapes).replace(r"\.\*", ".*")):
    load({**arrays, key: swapped})
  with pytest.raises(
    torch_layout.WeightsError, match="keys the .* network does not use.*AuxLogits"
  ):
    load({**arrays, "AuxLogits.conv0.conv.weight": np.zeros(1)})
  # Accepted: BatchNorm counters and a DataParallel "module." prefix.
  counter = next(k for k in arrays if k.endswith(".bn.weight")).replace(
    "weight", "num_batches_tracked"
  )
  loaded = load({f"module.{k}": v for k, v in {**arrays, counter: np.zeros(())}.items()})
  np.testing.assert_array_equal(net.export(loaded)[key], arrays[key])
  # Inception's 1008-way classifier head is in pytorch-fid's file and not used; I3D has no `fc`.
  head = {"fc.weight": np.zeros((1008, 2048)), "fc.bias": np.zeros(1008)}
  if name == "inception":
    load({**arrays, **head})
  else:
    with pytest.raises(torch_layout.WeightsError, match=r"\['fc.bias', 'fc.weight'\]"):
      load({**arrays, **head})


def test_missing_weights_and_bad_options(nets):
  with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth.*np.savez"):
    frechet.EXTRACTORS["inception"]()
  with pytest.raises(FileNotFoundError, match="'/nowhere/i3d.npz' does not exist.*rgb_imagenet.pt"):
    frechet.EXTRACTORS["i3d"](weights="/nowhere/i3d.npz")
  with pytest.raises(ValueError, match="frames='first' is unknown"):
    inception.extractor(weights=nets["inception"][1][".npz"], frames="first")
  with pytest.raises(ValueError, match="min_frames=8: I3D needs at least 9"):
    i3d.extractor(weights=nets["i3d"][1][".npz"], min_frames=8)
  with pytest.raises(TypeError, match="framez"):
    frechet.EXTRACTORS["inception"](weights=nets["inception"][1][".npz"], framez="mean")


# ---------------------------------------------------------------------------------------------
# FD through the registered extractor (the evaluator's own lookup and formula; its sampling
# and real-video path run with a trained model in tests/test_evaluators.py).
# ---------------------------------------------------------------------------------------------
def test_frechet_with_the_registered_extractor(nets):
  features_of = frechet.EXTRACTORS["i3d"](weights=nets["i3d"][1][".npz"], features="pool")
  real = features_of(VIDEOS)
  assert real.shape == (len(VIDEOS), 1024)
  assert frechet.frechet_of_features(real, features_of(VIDEOS)) == pytest.approx(0.0, abs=1e-6)
  assert frechet.frechet_of_features(real, features_of(VIDEOS[:, ::-1])) > 1e-6
