"""Tests of pretrained weight import: numerical parity with Keras and torchvision, the key
mapping, clear errors for bad files, and the convert / predict command lines."""

import ast
import importlib.util
import os
import pathlib
import subprocess
import sys
import tomllib

import chex
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from densenet_jax import convert, imagenet, models, predict, pretrained

TORCH_REASON = "torch/torchvision not installed: pip install torch torchvision to run parity"
KERAS_REASON = "keras not installed: pip install '.[test]' to run the Keras parity test"
REPO = pathlib.Path(__file__).resolve().parents[1]

# torchvision's DenseNet configurations: growth rate, block layers, stem channels.
TORCHVISION = {
    "densenet121": (32, (6, 12, 24, 16), 64),
    "densenet161": (48, (6, 12, 36, 24), 96),
    "densenet169": (32, (6, 12, 32, 32), 64),
    "densenet201": (32, (6, 12, 48, 32), 64),
}

# Runs in a fresh interpreter: KERAS_BACKEND must be set before keras is first imported, and
# pytest's process may already hold keras (or TensorFlow's) under another backend.
KERAS_SCRIPT = r"""
import os, sys
os.environ["KERAS_BACKEND"] = "jax"
import jax
jax.config.update("jax_threefry_partitionable", False)  # 2x faster initialiser compiles
import keras
import numpy as np

out = sys.argv[1]
keras.utils.set_random_seed(0)
model = keras.applications.DenseNet121(weights=None, input_shape=(64, 64, 3),
                                       classifier_activation=None)
# weights=None leaves BN at gamma 1, beta 0, mean 0, var 1 and the head bias at 0, which
# would hide a swapped mapping; random values make every tensor count.
rng = np.random.default_rng(0)
for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
        c = layer.gamma.shape[0]
        layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c),
                           rng.normal(0, 0.1, c), rng.uniform(0.5, 1.5, c)])
head = model.get_layer("predictions")
head.set_weights([head.get_weights()[0], rng.normal(0, 0.1, 1000)])
x = rng.normal(size=(2, 64, 64, 3)).astype("float32")
probe = keras.Model(model.input, [model.get_layer("conv4_block24_concat").output, model.output])
block3, logits = probe.predict(x, verbose=0)
model.save_weights(f"{out}/keras121.weights.h5")
model.save(f"{out}/keras121.h5")  # legacy HDF5 (weights under model_weights/)
model.save(f"{out}/keras121.keras")  # zip archive holding model.weights.h5
np.savez(f"{out}/reference.npz", x=x, logits=logits, block3=block3)
"""


PREDICT_WITHOUT_TFDS = (
    "import sys; sys.modules['tensorflow_datasets'] = None\n"
    "from densenet_jax import predict; sys.exit(predict.main(sys.argv[1:]))")


def max_abs_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def tree_max_abs_diff(a, b) -> float:
  chex.assert_trees_all_equal_shapes(a, b)
  return max(jax.tree.leaves(jax.tree.map(max_abs_diff, a, b)))


def logits_and_block3(model, variables, x):
  """Logits and denseblock3's output (a BatchNorm-heavy feature map) from one compile."""
  def forward(v, x):
    logits, state = model.apply(
        v, x, capture_intermediates=lambda mdl, method: mdl.name == "denseblock3")
    return logits, state["intermediates"]["denseblock3"]["__call__"][0]
  return jax.jit(forward)(variables, x)


def torchvision_state_dict(name: str, seed: int = 0, old_keys: bool = False) -> dict:
  """The keys and shapes of torchvision.models.<name>().state_dict(), random values."""
  growth, blocks, channels = TORCHVISION[name]
  rng = np.random.default_rng(seed)
  sd = {}

  def conv(key, out_c, in_c, k):
    sd[f"{key}.weight"] = rng.normal(0, (2 / (in_c * k * k)) ** 0.5,
                                     (out_c, in_c, k, k)).astype(np.float32)

  def norm(key, c):
    sd[f"{key}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    sd[f"{key}.bias"] = rng.normal(0, 0.1, c).astype(np.float32)
    sd[f"{key}.running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
    sd[f"{key}.running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    sd[f"{key}.num_batches_tracked"] = np.array(7, np.int64)

  sep = "." if old_keys else ""  # pre-2017 checkpoints: 'norm.1', 'conv.2'
  conv("features.conv0", channels, 3, 7)
  norm("features.norm0", channels)
  for b, num_layers in enumerate(blocks, 1):
    for l in range(num_layers):
      prefix = f"features.denseblock{b}.denselayer{l + 1}."
      norm(f"{prefix}norm{sep}1", channels + l * growth)
      conv(f"{prefix}conv{sep}1", 4 * growth, channels + l * growth, 1)
      norm(f"{prefix}norm{sep}2", 4 * growth)
      conv(f"{prefix}conv{sep}2", growth, 4 * growth, 3)
    channels += num_layers * growth
    if b < len(blocks):
      norm(f"features.transition{b}.norm", channels)
      conv(f"features.transition{b}.conv", channels // 2, channels, 1)
      channels //= 2
  norm("features.norm5", channels)
  sd["classifier.weight"] = rng.normal(0, 0.03, (1000, channels)).astype(np.float32)
  sd["classifier.bias"] = rng.normal(0, 0.1, 1000).astype(np.float32)
  return sd


def truncate(path: pathlib.Path) -> pathlib.Path:
  """The same file cut in half, as an interrupted download leaves it."""
  data = path.read_bytes()
  cut = path.with_name("truncated_" + path.name)
  cut.write_bytes(data[: len(data) // 2])
  return cut


def run_module(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                        cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def tv121(tmp_path_factory) -> tuple[dict, pathlib.Path]:
  """A synthetic torchvision densenet121 state_dict and its .npz file."""
  sd = torchvision_state_dict("densenet121")
  path = tmp_path_factory.mktemp("tv") / "densenet121.npz"
  np.savez(path, **sd)
  return sd, path


@pytest.fixture(scope="module")
def keras_files(tmp_path_factory) -> pathlib.Path:
  """Keras DenseNet121 weight files and its reference outputs, made in a subprocess."""
  if importlib.util.find_spec("keras") is None:
    pytest.skip(KERAS_REASON)
  out = tmp_path_factory.mktemp("keras")
  env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([sys.executable, "-c", KERAS_SCRIPT, str(out)], capture_output=True,
                        text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out


# ------------------------------------------------------------------------------- Keras

@pytest.mark.slow
def test_keras_densenet121_matches_keras_logits_and_features(keras_files):
  model, variables = pretrained.from_keras(keras_files / "keras121.weights.h5", "densenet121")
  assert model.bn_epsilon == 1.001e-5 and model.num_classes == 1000
  ref = np.load(keras_files / "reference.npz")
  logits, block3 = logits_and_block3(model, variables, ref["x"])
  d_logits = max_abs_diff(logits, ref["logits"])
  d_block3 = max_abs_diff(block3, ref["block3"])
  print(f"keras densenet121 max|dlogits| {d_logits:.2e} (|logits| <= "
        f"{np.abs(ref['logits']).max():.2f}), max|dblock3| {d_block3:.2e}")
  assert d_logits <= 1e-4
  assert d_block3 <= 1e-4
  assert np.abs(ref["logits"]).max() > 0.1  # large enough for the tolerance to mean something


@pytest.mark.slow
def test_keras_legacy_h5_archive_and_unnamed_keras3_layout_give_the_same_variables(
    keras_files, tmp_path):
  _, from_v3 = pretrained.from_keras(keras_files / "keras121.weights.h5", "densenet121")
  for other in ("keras121.h5", "keras121.keras"):
    _, from_other = pretrained.from_keras(keras_files / other, "densenet121")
    assert tree_max_abs_diff(from_v3, from_other) == 0.0, other
  # Keras < 3.10 wrote no layer names into .weights.h5: the converter falls back to order.
  unnamed = tmp_path / "unnamed.weights.h5"
  unnamed.write_bytes((keras_files / "keras121.weights.h5").read_bytes())
  with h5py.File(unnamed, "r+") as f:
    for key in f["layers"]:
      f["layers"][key]["vars"].attrs.pop("name", None)
  _, from_order = pretrained.from_keras(unnamed, "densenet121")
  assert tree_max_abs_diff(from_v3, from_order) == 0.0
  # include_top=False files (the published *_notop.h5) give a headless model.
  layers = pretrained.read_keras(keras_files / "keras121.weights.h5")
  del layers["predictions"]
  headless, v = pretrained.from_keras(layers, "densenet121")
  assert headless.num_classes == 0 and "classifier" not in v["params"]


@pytest.mark.slow
def test_keras_weights_into_the_wrong_model_name_the_keys(keras_files):
  with pytest.raises(ValueError) as e:
    pretrained.from_keras(keras_files / "keras121.weights.h5", "densenet169")
  msg = str(e.value)
  assert "does not fit densenet169" in msg and "missing" in msg
  assert "'pool4_bn/gamma' (-> params/transition3/norm/scale) has shape (1024,)" in msg
  assert "expects (1280,)" in msg and "looks like densenet121" in msg


@pytest.mark.slow
def test_convert_cli_keras_records_epsilon_and_load_rebuilds(keras_files, tmp_path):
  out = tmp_path / "k121.npz"
  proc = run_module("densenet_jax.convert", "--from", "keras", "--model", "densenet121",
                    str(keras_files / "keras121.weights.h5"), str(out))
  assert proc.returncode == 0, proc.stderr
  assert "densenet121 from keras" in proc.stdout
  model, variables, meta = pretrained.load_with_metadata(out)
  assert meta["bn_epsilon"] == model.bn_epsilon == 1.001e-5
  assert meta["source"] == "keras" and meta["model"] == "densenet121"
  _, direct = pretrained.from_keras(keras_files / "keras121.weights.h5", "densenet121")
  assert tree_max_abs_diff(variables, direct) == 0.0
  # Overrides that keep the variables' shapes apply to the rebuilt model.
  backbone, _ = pretrained.load(out, features_only=True)
  stages = jax.eval_shape(lambda v: backbone.apply(v, jnp.zeros((1, 64, 64, 3))), variables)
  assert stages["block4"].shape == (1, 2, 2, 1024)


# ------------------------------------------------------ torchvision (synthetic, no torch)

def test_torchvision_key_mapping_and_layouts(tv121):
  sd, path = tv121
  model, v = pretrained.from_torchvision(path, "densenet121")
  assert model.bn_epsilon == 1e-5 and model.num_classes == 1000
  assert models.count_params(v["params"]) == 7_978_856
  p, s = v["params"], v["batch_stats"]
  np.testing.assert_array_equal(p["conv0"]["kernel"],
                                sd["features.conv0.weight"].transpose(2, 3, 1, 0))
  layer = "features.denseblock3.denselayer7"
  np.testing.assert_array_equal(p["denseblock3"]["denselayer7"]["conv2"]["kernel"],
                                sd[f"{layer}.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p["denseblock3"]["denselayer7"]["norm1"]["scale"],
                                sd[f"{layer}.norm1.weight"])
  np.testing.assert_array_equal(s["denseblock3"]["denselayer7"]["norm2"]["var"],
                                sd[f"{layer}.norm2.running_var"])
  np.testing.assert_array_equal(p["transition2"]["conv"]["kernel"][0, 0],
                                sd["features.transition2.conv.weight"][:, :, 0, 0].T)
  np.testing.assert_array_equal(p["norm_final"]["bias"], sd["features.norm5.bias"])
  np.testing.assert_array_equal(s["norm_final"]["mean"], sd["features.norm5.running_mean"])
  np.testing.assert_array_equal(p["classifier"]["kernel"], sd["classifier.weight"].T)
  np.testing.assert_array_equal(p["classifier"]["bias"], sd["classifier.bias"])


def test_old_torchvision_keys_and_safetensors_give_the_same_variables(tv121, tmp_path):
  sd, path = tv121
  _, reference = pretrained.from_torchvision(path, "densenet121")
  old = torchvision_state_dict("densenet121", old_keys=True)
  assert "features.denseblock1.denselayer1.norm.1.weight" in old
  _, from_old = pretrained.from_torchvision(old, "densenet121")
  assert tree_max_abs_diff(reference, from_old) == 0.0
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  st = tmp_path / "densenet121.safetensors"
  safetensors_numpy.save_file({f"module.{k}": v for k, v in old.items()}, str(st))
  _, from_st = pretrained.from_torchvision(st, "densenet121")
  assert tree_max_abs_diff(reference, from_st) == 0.0


def test_class_count_comes_from_the_file():
  sd = torchvision_state_dict("densenet121")
  sd["classifier.weight"] = sd["classifier.weight"][:10]
  sd["classifier.bias"] = sd["classifier.bias"][:10]
  model, v = pretrained.from_torchvision(sd, "densenet121")  # a 10-class fine-tuned model
  assert model.num_classes == 10 and v["params"]["classifier"]["kernel"].shape == (1024, 10)
  del sd["classifier.weight"], sd["classifier.bias"]
  assert pretrained.from_torchvision(sd, "densenet121")[0].num_classes == 0


def test_converted_variables_do_not_alias_the_source_arrays():
  sd = torchvision_state_dict("densenet121")
  _, v = pretrained.from_torchvision(sd, "densenet121")
  before = np.array(v["params"]["norm0"]["scale"])
  sd["features.norm0.weight"] += 1.0  # e.g. a torch optimizer updating the model in place
  np.testing.assert_array_equal(v["params"]["norm0"]["scale"], before)


@pytest.mark.parametrize("name", ["densenet161", "densenet169", "densenet201"])
def test_every_torchvision_densenet_converts(name):
  model, v = pretrained.from_torchvision(torchvision_state_dict(name), name)
  expected = {"densenet161": 28_681_000, "densenet169": 14_149_480,
              "densenet201": 20_013_928}[name]
  assert models.count_params(v["params"]) == expected
  assert model.growth_rate == TORCHVISION[name][0]


def test_wrong_model_names_the_key_and_both_shapes(tmp_path):
  path = tmp_path / "densenet169.npz"
  np.savez(path, **torchvision_state_dict("densenet169"))
  with pytest.raises(ValueError) as e:
    pretrained.from_torchvision(path, "densenet121")
  msg = str(e.value)
  assert ("'features.transition3.norm.weight' (-> params/transition3/norm/scale) has shape "
          "(1280,) in the file but densenet121 expects (1024,)") in msg
  assert "looks like densenet169" in msg


def test_single_bad_tensor_missing_and_unexpected_keys():
  sd = torchvision_state_dict("densenet121")
  sd["features.denseblock2.denselayer3.conv1.weight"] = np.zeros((128, 191, 1, 1), np.float32)
  with pytest.raises(ValueError, match=r"'features\.denseblock2\.denselayer3\.conv1\.weight' "
                     r"\(-> params/denseblock2/denselayer3/conv1/kernel\) has shape "
                     r"\(1, 1, 191, 128\) in the file but densenet121 expects "
                     r"\(1, 1, 192, 128\)"):
    pretrained.from_torchvision(sd, "densenet121")
  sd = torchvision_state_dict("densenet121")
  del sd["features.norm0.running_var"]
  sd["features.extra.weight"] = np.zeros((3,), np.float32)
  with pytest.raises(ValueError) as e:
    pretrained.from_torchvision(sd, "densenet121")
  assert "batch_stats/norm0/var (64,) is missing from the file" in str(e.value)
  assert "'features.extra.weight' (-> params/extra/scale, shape (3,)) has no place" in str(e.value)


def test_corrupt_and_foreign_files_give_clear_errors(tv121, tmp_path):
  _, path = tv121
  for bad in (truncate(path), tmp_path / "junk.npz"):
    if bad.name == "junk.npz":
      bad.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="Cannot read .* as a torchvision state_dict"):
      pretrained.from_torchvision(bad, "densenet121")
  st = tmp_path / "x.safetensors"
  st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
  with pytest.raises(ValueError, match="Cannot read .*x.safetensors"):
    pretrained.from_torchvision(st, "densenet121")
  h5 = tmp_path / "broken.weights.h5"
  with h5py.File(h5, "w") as f:
    f["x"] = np.zeros(100000, np.float32)
  with pytest.raises(ValueError, match="Cannot read .* as Keras weights"):
    pretrained.from_keras(truncate(h5), "densenet121")
  with pytest.raises(ValueError, match="not Keras weights"):
    pretrained.from_keras(h5, "densenet121")
  with pytest.raises(ValueError, match="Unknown torchvision weight format '.onnx'"):
    (tmp_path / "m.onnx").write_bytes(b"")
    pretrained.from_torchvision(tmp_path / "m.onnx", "densenet121")
  with pytest.raises(FileNotFoundError, match="No such weight file"):
    pretrained.from_torchvision(tmp_path / "absent.pth", "densenet121")
  # A state_dict is not a converted checkpoint, and a cut checkpoint is caught too.
  with pytest.raises(ValueError, match="not a densenet-jax checkpoint"):
    pretrained.load(path)


def test_pth_without_torch_explains_itself(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
  (tmp_path / "w.pth").write_bytes(b"\x80\x02")
  with pytest.raises(ImportError, match="needs PyTorch.*safetensors"):
    pretrained.from_torchvision(tmp_path / "w.pth", "densenet121")


# ------------------------------------------------------------------ command lines

def test_convert_cli_infers_the_model_and_reports_errors(tv121, tmp_path, capsys):
  _, path = tv121
  out = tmp_path / "ck.npz"
  assert convert.main(["--from", "torchvision", str(path), str(out)]) == 0
  assert "densenet121 from torchvision" in capsys.readouterr().out
  model, _ = pretrained.load(out)
  assert model.bn_epsilon == 1e-5
  with pytest.raises(ValueError, match="Cannot read .* densenet-jax checkpoint"):
    pretrained.load(truncate(out))
  assert convert.main(["--from", "torchvision", "--model", "densenet201", str(path),
                       str(tmp_path / "no.npz")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("convert: error: torchvision weights") and "Traceback" not in err
  assert "expects" in err and "looks like densenet121" in err
  assert not (tmp_path / "no.npz").exists()


def test_predict_cli_prints_top5_imagenet_labels(tv121, tmp_path):
  from PIL import Image

  _, path = tv121
  weights = tmp_path / "densenet121.npz"
  pretrained.convert("torchvision", path, weights, "densenet121")
  rng = np.random.default_rng(0)
  images = [tmp_path / "a.png", tmp_path / "b.jpg"]
  Image.fromarray(rng.integers(0, 256, (200, 300, 3), np.uint8)).save(images[0])
  Image.fromarray(rng.integers(0, 256, (260, 240, 3), np.uint8)).save(images[1])
  # tensorflow_datasets made unimportable: the label names must come from the package.
  proc = subprocess.run([sys.executable, "-c", PREDICT_WITHOUT_TFDS, "--weights", str(weights),
                         *map(str, images)], capture_output=True, text=True, cwd=REPO,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert len(lines) == 12 and lines[0] == str(images[0]) and lines[6] == str(images[1])
  labels = imagenet.labels()
  for block in (lines[1:6], lines[7:12]):
    probs = [float(line.split()[0]) for line in block]
    assert all(0.0 <= p <= 1.0 for p in probs) and sum(probs) <= 1.0 + 1e-3
    assert probs == sorted(probs, reverse=True)
    assert all(line.split(None, 1)[1] in labels for line in block)


def test_packaged_labels_are_the_imagenet_classes_and_declared_package_data():
  labels = imagenet.labels()
  assert len(labels) == 1000 and len({l.split()[0] for l in labels}) == 1000
  assert labels[0] == "n01440764 tench, Tinca tinca"
  assert labels[999] == "n15075141 toilet tissue, toilet paper, bathroom tissue"
  pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
  assert "imagenet_labels.txt" in pyproject["tool"]["setuptools"]["package-data"]["densenet_jax"]


def test_packaged_labels_match_the_tfds_files_they_were_made_from():
  spec = importlib.util.find_spec("tensorflow_datasets")  # locates without importing TF
  if spec is None:
    pytest.skip("tensorflow_datasets not installed ([train] extra)")
  root = pathlib.Path(list(spec.submodule_search_locations)[0])
  wnids = (root / "datasets/imagenet2012/labels.txt").read_text().split()
  # The readable names (same class order) are a Python list in tfds's SI-Score dataset.
  tree = ast.parse((root / "datasets/siscore/labels.py").read_text())
  names = next(ast.literal_eval(node.value) for node in ast.walk(tree)
               if isinstance(node, ast.Assign) and
               getattr(node.targets[0], "id", "") == "IMAGENET_LABELS_LIST")
  assert imagenet.labels() == [f"{w} {n}" for w, n in zip(wnids, names, strict=True)]


def test_preprocess_matches_torchvision_eval_transform_shape_and_stats():
  from PIL import Image

  image = Image.fromarray(np.full((300, 500, 3), 255, np.uint8))
  x = predict.preprocess(image)
  assert x.shape == (224, 224, 3) and x.dtype == np.float32
  expected = (1.0 - np.array(imagenet.MEAN)) / np.array(imagenet.STD)
  np.testing.assert_allclose(x[0, 0], expected, rtol=1e-6)


# ------------------------------------------------------------ torchvision (real torch)

def _torch_densenet(name: str, seed: int = 0, **config):
  """A torchvision DenseNet with random BN statistics and affine terms (not 1/0/0/1)."""
  torch = pytest.importorskip("torch", reason=TORCH_REASON)
  torchvision = pytest.importorskip("torchvision", reason=TORCH_REASON)
  torch.manual_seed(seed)
  if config:  # torchvision's DenseNet class with a custom layout
    net = torchvision.models.DenseNet(**config)
  else:
    net = getattr(torchvision.models, name)(weights=None)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.1)
        m.running_mean.normal_(0.0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
    net.classifier.bias.normal_(0.0, 0.1)
  return torch, net


def test_torchvision_densenet121_inference_parity_through_a_pth_file(tmp_path):
  torch, net = _torch_densenet("densenet121")
  net.eval()
  # Save with pre-2017 key names, as the published .pth files have them.
  old = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2.")
         if "denselayer" in k else k: v for k, v in net.state_dict().items()}
  torch.save(old, tmp_path / "densenet121.pth")
  x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
  with torch.no_grad():
    ref_logits = net(torch.from_numpy(x)).numpy()
    ref_block3 = net.features[:9](torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  model, v = pretrained.from_torchvision(tmp_path / "densenet121.pth", "densenet121")
  logits, block3 = logits_and_block3(model, v, x.transpose(0, 2, 3, 1))
  d_logits, d_block3 = max_abs_diff(logits, ref_logits), max_abs_diff(block3, ref_block3)
  print(f"torchvision densenet121 max|dlogits| {d_logits:.2e} (|logits| <= "
        f"{np.abs(ref_logits).max():.2f}), max|dblock3| {d_block3:.2e}")
  assert d_logits <= 1e-4 and d_block3 <= 1e-4


@pytest.mark.parametrize("name", ["densenet161", "densenet169", "densenet201"])
def test_real_torchvision_state_dicts_convert(name):
  _, net = _torch_densenet(name)
  _, v = pretrained.from_torchvision(net.state_dict(), name)
  assert models.count_params(v["params"]) == sum(p.numel() for p in net.parameters())


def test_preprocess_equals_torchvision_eval_transform():
  pytest.importorskip("torch", reason=TORCH_REASON)
  transforms = pytest.importorskip("torchvision.transforms", reason=TORCH_REASON)
  from PIL import Image

  transform = transforms.Compose([
      transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
      transforms.Normalize(imagenet.MEAN, imagenet.STD)])
  rng = np.random.default_rng(0)
  for shape in [(333, 517, 3), (517, 333, 3), (240, 260, 3)]:
    image = Image.fromarray(rng.integers(0, 256, shape, np.uint8))
    expected = transform(image).numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(predict.preprocess(image), expected, atol=1e-6)


def _bn_counts(model: models.DenseNet, batch: int, size: int) -> dict[str, int]:
  """n = batch * height * width seen by each BatchNorm (its batch-variance denominator)."""
  stem = (size + 1) // 2  # norm0 follows the 7x7/2 conv
  side = (stem + 1) // 2  # blocks start after the 3x3/2 max pool
  counts = {"norm0": batch * stem * stem}
  for b in range(1, len(model.block_config) + 1):
    counts[f"denseblock{b}"] = counts[f"transition{b}"] = batch * side * side
    final = batch * side * side
    side //= 2
  counts["norm_final"] = final
  return counts


def test_one_sgd_step_matches_torch_and_running_var_differs_by_n_over_n_minus_1():
  # A small 4-block DenseNet-BC keeps the gradient compile short; the layer types, names and
  # training semantics are those of densenet121.
  config = dict(growth_rate=8, block_config=(2, 3, 4, 3), num_init_features=16)
  torch, net = _torch_densenet("custom", seed=1, **config)
  model = models.densenet_imagenet(**config)
  model, v = pretrained.from_torchvision(net.state_dict(), model)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 3, 64, 64)).astype(np.float32)
  y = np.array([3, 997])
  # torch: plain SGD, lr 0.1, no momentum, no weight decay; BN in training mode.
  net.train()
  optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
  loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
  loss.backward()
  optimizer.step()
  _, torch_after = pretrained.from_torchvision(net.state_dict(), model)

  def loss_fn(params, batch_stats, x, y):
    logits, state = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                train=True, mutable=["batch_stats"])
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1)), state["batch_stats"]

  @jax.jit
  def step(v, x, y):
    (l, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        v["params"], v["batch_stats"], x, y)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, v["params"], grads)
    return l, {"params": params, "batch_stats": stats}

  flax_loss, flax_after = step(v, x.transpose(0, 2, 3, 1), y)
  d_loss = abs(float(flax_loss) - loss.item())
  d_params = tree_max_abs_diff(flax_after["params"], torch_after["params"])
  d_update = tree_max_abs_diff(flax_after["params"], v["params"])
  print(f"one SGD step: |dloss| {d_loss:.2e}, max|dparams| {d_params:.2e} "
        f"(largest update {d_update:.2e})")
  assert d_loss <= 1e-5 and d_params <= 1e-5
  assert d_update > 1000 * d_params  # the step moved the weights far beyond the mismatch

  # Running statistics: the means agree; torch blends in the unbiased batch variance
  # (times n/(n-1)) where Flax uses the biased one, so correct Flax's update to predict it.
  counts = _bn_counts(model, batch=2, size=64)
  old = jax.tree_util.tree_flatten_with_path(v["batch_stats"])[0]
  new = jax.tree.leaves(flax_after["batch_stats"])
  ref = jax.tree.leaves(torch_after["batch_stats"])
  worst_raw, worst_corrected, worst_mean = 0.0, 0.0, 0.0
  for (path, before), ours, theirs in zip(old, new, ref):
    top = path[0].key
    if path[-1].key == "mean":
      worst_mean = max(worst_mean, max_abs_diff(ours, theirs))
      continue
    n = counts[top]
    momentum = 0.1  # torch's convention; flax bn_momentum = 0.9
    batch_var = (np.asarray(ours) - (1 - momentum) * np.asarray(before)) / momentum
    predicted = (1 - momentum) * np.asarray(before) + momentum * batch_var * n / (n - 1)
    worst_corrected = max(worst_corrected, max_abs_diff(predicted, theirs))
    worst_raw = max(worst_raw, max_abs_diff(ours, theirs))
  print(f"running var: raw max|d| {worst_raw:.2e}, n/(n-1)-corrected {worst_corrected:.2e}; "
        f"running mean max|d| {worst_mean:.2e}")
  assert worst_mean <= 1e-5
  assert worst_corrected <= 1e-5
  assert worst_raw > 100 * worst_corrected  # the correction is real, not noise
