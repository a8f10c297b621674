"""Frechet Inception Distance and Inception Score of a sample file, as ADM's evaluator
computes them (openai/guided-diffusion, evaluations/evaluator.py), with a user-given network.

    python -m epg_fast.fid SAMPLES.npz REF.npz --inception FILE [--batch-size 100] [--device auto]

SAMPLES.npz: `arr_0` uint8 [N, H, W, 3] (what `python -m epg_fast.sample` writes; any ADM
sample batch). REF.npz: an ADM reference batch such as VIRTUAL_imagenet256_labeled.npz, whose
`mu` and `sigma` (pool_3 statistics) are used as they are; a reference holding only images
`arr_0` gets its statistics from the same network. Both files are read in batches, never
whole.

The Inception network
---------------------
Its weights cannot be downloaded here, so FILE is a TorchScript module (torch.jit.load) that
the user provides. The contract:

- input: float32 [B, 3, H, W], RGB, values 0..255 (the uint8 pixels, converted exactly), at
  the images' own resolution. Resizing to 299 x 299 and the input normalisation happen
  inside the module, as in the TensorFlow graph ADM runs (whose input is the 0..255 image
  of any size).
- output: pool_3 features [B, 2048], or a tuple (features [B, 2048], logits [B, 1008]).
  With logits the Inception Score is reported too. ADM's logits are pool_3 @ W of the
  graph's `softmax/logits` layer, without its bias; log-probabilities work as well, since
  softmax(log p) = p.

One way to make such a file, on a machine with internet access: the `pytorch-fid` package
(it needs torchvision) ships "FID Inception" weights ported from the TensorFlow graph:

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

Ports of the same weights differ slightly from ADM's graph (resize kernels, numerics), and so
do their FIDs: before comparing with published numbers, check the file once against ADM's
evaluator on one sample file.

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
- Inception Score: ADM's, softmax over the logits in consecutive splits of 5000 images
  (10 splits at 50k): exp(mean over the split of KL(p(y|x) || p(y))), averaged over splits.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
import torch

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
# The network


def load_inception(path: Path, device: torch.device) -> torch.jit.ScriptModule:
    if not path.is_file():
        raise FIDError(f"Inception network {path} does not exist")
    try:
        net = torch.jit.load(str(path), map_location=device)
    except RuntimeError as err:
        raise FIDError(f"{path} is not a TorchScript module ({str(err).strip().splitlines()[0]})") from None
    return net.eval()


@torch.no_grad()
def inception_outputs(net: torch.nn.Module, batches: Iterator[np.ndarray],
                      device: torch.device) -> tuple[np.ndarray, np.ndarray | None]:
    """(pool features [N, D] float32, logits [N, K] float32 or None) of uint8 NHWC batches."""
    features, logits = [], []
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


# ---------------------------------------------------------------------------------------
# The evaluation


def reference_kind(path: Path) -> str:
    """"stats" (mu and sigma), or "images" (arr_0 only, checked)."""
    if not path.is_file():
        raise FIDError(f"{path} does not exist")
    if not zipfile.is_zipfile(path):
        raise FIDError(f"{path} is not an npz file")
    with np.load(path) as f:
        keys = set(f.files)
    if {"mu", "sigma"} <= keys:
        return "stats"
    if "arr_0" in keys:
        check_images(path)
        return "images"
    found = ", ".join(sorted(keys)) or "none"
    raise FIDError(f"{path} holds neither 'mu' and 'sigma' nor images 'arr_0' (keys: {found})")


def evaluate(samples: Path, reference: Path, inception: Path, batch_size: int = 100,
             device: torch.device | str = "cpu") -> dict[str, float | int | None]:
    """{"fid", "inception_score" (None without logits), "num_samples", "reference" ("stats"
    or "images")}; raises FIDError."""
    samples, reference, inception, device = Path(samples), Path(reference), Path(inception), torch.device(device)
    num = check_images(samples)[0]
    kind = reference_kind(reference)
    net = load_inception(inception, device)
    features, logits = inception_outputs(net, image_batches(samples, batch_size), device)
    mu, sigma = feature_statistics(features)
    if kind == "stats":
        with np.load(reference) as f:
            mu_ref, sigma_ref = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    else:
        mu_ref, sigma_ref = feature_statistics(inception_outputs(net, image_batches(reference, batch_size), device)[0])
    return {
        "fid": frechet_distance(mu, sigma, mu_ref, sigma_ref),
        "inception_score": None if logits is None else inception_score(logits),
        "num_samples": num,
        "reference": kind,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m epg_fast.fid", description=__doc__.split("\n\n")[0])
    p.add_argument("samples", help="sample npz: arr_0 uint8 [N, H, W, 3]")
    p.add_argument("reference", help="ADM reference batch npz (mu, sigma) or images arr_0")
    p.add_argument("--inception", required=True, help="TorchScript Inception network (see the module docstring)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = p.parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if device == "cuda" and not torch.cuda.is_available():
            raise FIDError("--device cuda, but CUDA is not available")
        result = evaluate(Path(args.samples), Path(args.reference), Path(args.inception), args.batch_size, device)
    except FIDError as err:
        print(f"epg_fast.fid: error: {err}", file=sys.stderr)
        return 2
    score = result["inception_score"]
    print(f"samples: {result['num_samples']} images from {args.samples}")
    used = "its mu and sigma" if result["reference"] == "stats" else "statistics of its images"
    print(f"reference: {args.reference} ({used})")
    print(f"Inception Score: {'n/a (the network returns no logits)' if score is None else f'{score:.4f}'}")
    print(f"FID: {result['fid']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
