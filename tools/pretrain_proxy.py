"""Pretrain a small timm ViT offline by formula-driven supervised learning: a proxy backbone with learned features.

No natural image is used and nothing is downloaded. Every class is a formula, every image a random instance of
it (FractalDB, Kataoka et al., ACCV 2020; "Can Vision Transformers Learn without Natural Images?", Nakashima et
al., AAAI 2022), and the network learns to tell the formulas apart from random views of their images. Five
families of formulas, because each teaches what the others lack:

* fractals: one random iterated function system (2-4 contractive affine maps) per class, rendered by the chaos
  game; instances perturb the maps' parameters (FractalDB's intra-class variation), placement and colours.
  Fractals teach contours and self-similar structure.
* contours: one closed radial curve ``r(t) = 1 + sum_k a_k sin(f_k t + p_k)`` per class (the radial-contour and
  VisualAtom datasets of Kataoka et al., CVPR 2022, and Takashima et al., CVPR 2023), filled or outlined;
  instances vary size, position, stroke and amplitudes slightly. Contours teach outlines and their orientation.
* strokes: one glyph of 2-4 quadratic Bezier curves per class (the Bezier-curve formulas Kataoka et al., IJCV
  2022, compare with fractals); instances jitter the control points, the stroke width and the placement.
  Strokes teach pen-like lines and their junctions.
* textures: one sum of oriented waves (frequencies, orientations, two colours) per class; instances shift the
  phases and jitter the rest. Textures teach frequency, orientation and colour, which fractals (drawn in
  random colours) do not.
* dead leaves: one palette of 3-6 colours, one leaf shape (disc, square or ellipse), one power law of leaf sizes
  and one 1/f^beta noise texture per class; every instance paints :data:`LEAVES_PER_IMAGE` random leaves back
  to front over a textured background (the dead-leaves model, Lee, Mumford and Huang, IJCV 2001, which
  "Learning to See by Looking at Noise", Baradad et al., NeurIPS 2021, found the best of its procedural
  sources for natural images). The palette's colours vary in luminance more than in chroma, as natural
  images' colours do. Dead leaves teach occlusion, scale invariance and the 1/f spectrum of photographs, which
  the drawn families lack.

Views: a random crop of 50-100% of the image resized back, a brightness/contrast jitter, and half the time a
lower resolution (6-16 pixels, upscaled back bicubically, as small images are); no flips or rotations, so
orientation stays learnable; a quarter of the views turn grey (``--grey-share``), so that colour alone never
names a class.

Objective: the formula classes, plus the view's pixels reconstructed linearly from the last block's patch
tokens (``--reconstruction``, the weight of that mean squared error; the masked-image-modelling target of
MAE, He et al., CVPR 2022, without the masking). Minutes of classification alone trade the pixel detail
that small images need (digits, colours) for the formulas' invariances, and a linear probe of such features
loses to random weights there; the reconstruction term keeps the detail in the residual stream. Training:
AdamW, a linear warm-up then a cosine decay, label smoothing, gradient clipping, and the patch projection
kept at its random init (MoCo v3, Chen et al., ICCV 2021, fixes it for stability). Weight decay 0.05 and label
smoothing 0.1 are DeiT's (Touvron et al., ICML 2021); gradient clipping at norm 1.0 is HF TrainingArguments'
default; the other settings (learning rate, warm-up, batch, reconstruction weight, class counts, the views'
strengths) are inca's own choice, sized so that a run takes at most about 20 minutes on one CPU thread on
shared cores (466 s measured on quiet cores, up to 1193 s for 1300 steps on busy ones, docs/proxy-recipe.md)
and shows each image about eight times (1300 steps of 128 views of the 20,480 images).

How these choices were made, and what follows: the views (no flips) and the reconstruction term were shaped on
the tasks docs/results.md reports (synth-orientation; digits and synth-colour, where classification alone lost
to random weights), so those tasks cannot also show that the features are learned. The dead-leaves family and
the number of steps were then chosen on a design set of images that plays no other part: crops of the
images matplotlib and scikit-learn bundle (Grace Hopper's portrait, the China and flower photographs, an MRI
slice, the Jacksboro fault's elevation raster, and one rendered illustration, a blue gift pack;
``tools/make_photo_task.py --source design``). The recipe was revisited because, on scikit-image's
photographs (``--source skimage``), the earlier recipe's linear probe lost to random weights. Candidates (no
grey views, a reconstruction weight of 100, the dead leaves, a longer run, and their combinations) were
compared on the design set only, against random weights by the linear and InCA probes, and checked on the
tasks above; docs/proxy-recipe.md gives every figure and command. The recipe is frozen at these defaults and
``--steps 1300``; the frozen recipe was run on scikit-image's photographs once, after the freeze.

``--minutes`` is the budget of the whole run: unless ``--steps`` fixes the number of steps, it is calibrated
once, after the first steps, to what fits the budget on this machine, and recorded; the run is deterministic
from ``--seed`` and the number of steps (rerun with ``--steps N`` to repeat it exactly, up to floating-point
nondeterminism). Writes ``OUT/model.safetensors`` (the backbone without its pretraining head, loadable with
``--weights OUT/model.safetensors``) and ``OUT/config.json`` = ``{"backbone": NAME, "model_kwargs": {...}}``
plus a record of the run, and prints the ``inca-*`` flags that use it.

    python tools/pretrain_proxy.py --out runs/proxy --steps 1300 --minutes 40     (the frozen recipe)

``--minutes 40`` leaves the end to ``--steps``: a 20-minute budget stops at about 1185 s, and 1300 steps took
up to 1193 s on busy cores.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.data import resolve_data_config
from timm.optim import param_groups_weight_decay

SIZE = 32  # images are generated at the proxy's input size
CALIBRATION_STEPS = 20  # steps timed to size the run to --minutes
SAVE_SECONDS = 15  # kept from the budget for writing the files
LEAVES_PER_IMAGE = 48  # leaves painted per dead-leaves image (not --leaves, the number of classes)
MIN_CROP_AREA = 0.5  # views keep at least half the image: a formula's shape fills it, a smaller crop loses it
LOW_RES_SHARE = 0.5  # views seen at 6-16 pixels and upscaled back, as small images are
MAX_GRAD_NORM = 1.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (model.safetensors, config.json)")
    parser.add_argument("--minutes", type=float, default=15.0,
                        help="wall-clock budget of the whole run (generation, training, saving)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone", default="vit_tiny_patch16_224")
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--fractals", type=int, default=48, help="fractal classes")
    parser.add_argument("--contours", type=int, default=32, help="contour classes")
    parser.add_argument("--strokes", type=int, default=96, help="stroke (Bezier glyph) classes")
    parser.add_argument("--textures", type=int, default=32, help="texture classes")
    parser.add_argument("--leaves", type=int, default=48, help="dead-leaves classes")
    parser.add_argument("--per-class", type=int, default=80, help="images generated per class")
    parser.add_argument("--steps", type=int, default=0,
                        help="training steps (0: as many as fit --minutes, calibrated after the first steps)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--reconstruction", type=float, default=10.0,
                        help="weight of the pixel-reconstruction loss from the last block's patch tokens (0: off)")
    parser.add_argument("--grey-share", type=float, default=0.25,
                        help="share of the views turned grey, so that colour alone never names a class")
    parser.add_argument("--freeze-patch-embed", action=argparse.BooleanOptionalAction, default=True,
                        help="keep the random patch projection fixed (MoCo v3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default); 1 stays fast when other processes share the "
                             "cores (two threads ran 2.6x slower than one on 2 busy cores)")
    args = parser.parse_args()
    if not 0 <= args.grey_share <= 1:
        parser.error(f"--grey-share must be between 0 and 1, got {args.grey_share:g}")
    return args


# ----------------------------------------------------------------------------------------------------
# Formulas: each family draws class parameters, then renders instances of a class as uint8 [n, 32, 32, 3].
# ----------------------------------------------------------------------------------------------------


def _canvas(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` noisy backgrounds of random colours and a random foreground colour each (float, 0-255)."""
    background = rng.uniform(0, 255, (n, 1, 1, 3))
    images = background + rng.normal(0, rng.uniform(0, 20, (n, 1, 1, 1)), (n, SIZE, SIZE, 3))
    foreground = rng.uniform(0, 255, (n, 1, 1, 3))
    too_close = np.abs(foreground - background).sum(-1, keepdims=True) < 150  # keep the figure visible
    foreground = np.where(too_close, 255 - background, foreground)
    return images, foreground


def _fractal_class(rng: np.random.Generator) -> np.ndarray:
    """A random IFS of 2-4 contractive affine maps ``[k, 6]`` (a, b, c, d, e, f), FractalDB-style, whose
    attractor is neither a point nor a blot (its singular values and determinants in a useful range)."""
    while True:
        maps = rng.uniform(-1, 1, (rng.integers(2, 5), 6))
        singular = np.linalg.svd(maps[:, :4].reshape(-1, 2, 2), compute_uv=False)
        if singular.max() < 0.95 and 0.35 < np.abs(np.linalg.det(maps[:, :4].reshape(-1, 2, 2))).sum() < 1.2:
            return maps


def _render_fractals(rng: np.random.Generator, maps: np.ndarray, n: int) -> np.ndarray:
    """Chaos game with 256 walkers per instance, maps perturbed per instance, scaled into the canvas."""
    walkers, iterations, burn = 256, 40, 8
    params = maps[None] * rng.uniform(0.9, 1.1, (n, *maps.shape))  # FractalDB's weight perturbation
    det = np.abs(params[..., 0] * params[..., 3] - params[..., 1] * params[..., 2]) + 1e-3
    cumulative = np.cumsum(det / det.sum(1, keepdims=True), 1)
    points = rng.uniform(-1, 1, (n, walkers, 2))
    cloud = []
    for t in range(iterations):
        choice = (rng.random((n, walkers, 1)) > cumulative[:, None, :-1]).sum(-1)  # [n, walkers]
        m = np.take_along_axis(params, choice[..., None], 1)  # [n, walkers, 6]
        x, y = points[..., 0], points[..., 1]
        points = np.stack([m[..., 0] * x + m[..., 1] * y + m[..., 4], m[..., 2] * x + m[..., 3] * y + m[..., 5]], -1)
        if t >= burn:
            cloud.append(points)
    cloud = np.concatenate(cloud, 1)  # [n, P, 2]
    low, high = np.percentile(cloud, 1, axis=1, keepdims=True), np.percentile(cloud, 99, axis=1, keepdims=True)
    extent = rng.uniform(0.55, 0.95, (n, 1, 1)) * (SIZE - 1)
    scale = extent / np.maximum(high - low, 1e-6).max(-1, keepdims=True)
    offset = rng.uniform(0, 1, (n, 1, 2)) * (SIZE - 1 - (high - low) * scale)
    pixels = np.clip(np.round((cloud - low) * scale + offset), 0, SIZE - 1).astype(np.int64)
    flat = pixels[..., 1] * SIZE + pixels[..., 0] + np.arange(n)[:, None] * SIZE * SIZE
    density = np.bincount(flat.ravel(), minlength=n * SIZE * SIZE).reshape(n, SIZE, SIZE, 1)
    alpha = np.clip(np.log1p(density) / np.log1p(np.percentile(density, 99, axis=(1, 2, 3), keepdims=True) + 1), 0, 1)
    images, foreground = _canvas(rng, n)
    return images * (1 - alpha) + foreground * alpha


def _contour_class(rng: np.random.Generator) -> dict:
    k = rng.integers(1, 4)
    return {"freq": rng.integers(2, 9, k), "amp": rng.uniform(0.08, 0.3, k), "phase": rng.uniform(0, 2 * np.pi, k),
            "filled": bool(rng.random() < 0.5)}


def _render_contours(rng: np.random.Generator, spec: dict, n: int) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    radius = rng.uniform(6, 13, (n, 1, 1))
    cy, cx = (rng.uniform(0, 1, (2, n, 1, 1)) * (SIZE - 2 * radius * 1.3) + radius * 1.3)
    dy, dx = yy - cy, xx - cx
    theta, dist = np.arctan2(dy, dx), np.hypot(dy, dx)
    amp = spec["amp"] * rng.uniform(0.8, 1.2, (n, 1, 1, len(spec["amp"])))
    phase = spec["phase"] + rng.normal(0, 0.1, (n, 1, 1, len(spec["phase"])))
    shape = radius * (1 + (amp * np.sin(spec["freq"] * theta[..., None] + phase)).sum(-1))
    if spec["filled"]:
        alpha = np.clip(shape - dist + 0.5, 0, 1)
    else:
        alpha = np.clip(rng.uniform(0.8, 1.8, (n, 1, 1)) - np.abs(dist - shape), 0, 1)
    images, foreground = _canvas(rng, n)
    return images * (1 - alpha[..., None]) + foreground * alpha[..., None]


def _stroke_class(rng: np.random.Generator) -> np.ndarray:
    """2-4 quadratic Bezier curves ``[k, 3, 2]`` (start, control, end) in the unit square: a glyph."""
    return rng.uniform(0.1, 0.9, (rng.integers(2, 5), 3, 2))


def _render_strokes(rng: np.random.Generator, curves: np.ndarray, n: int) -> np.ndarray:
    t = np.linspace(0, 1, 24)[:, None]
    points = curves[None] + rng.normal(0, 0.035, (n, *curves.shape))  # [n, k, 3, 2]
    a, b, c = points[:, :, 0, None], points[:, :, 1, None], points[:, :, 2, None]
    path = ((1 - t) ** 2 * a + 2 * t * (1 - t) * b + t**2 * c).reshape(n, -1, 2)  # [n, k*24, 2]
    scale = rng.uniform(0.6, 1.0, (n, 1, 1)) * (SIZE - 1)
    path = path * scale + rng.uniform(0, 1, (n, 1, 2)) * (SIZE - 1 - scale)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    grid = np.stack([xx, yy], -1).reshape(1, -1, 1, 2)
    dist = np.sqrt(((grid - path[:, None]) ** 2).sum(-1)).min(-1).reshape(n, SIZE, SIZE)
    alpha = np.clip(rng.uniform(0.8, 4.5, (n, 1, 1)) - dist, 0, 1)[..., None]  # pen to brush widths
    images, foreground = _canvas(rng, n)
    return images * (1 - alpha) + foreground * alpha


def _texture_class(rng: np.random.Generator) -> dict:
    k = rng.integers(1, 4)
    return {"freq": rng.uniform(0.08, 0.45, k), "angle": rng.uniform(0, np.pi, k),
            "colours": rng.uniform(0, 255, (2, 3)), "sharpness": rng.uniform(1, 6)}


def _render_textures(rng: np.random.Generator, spec: dict, n: int) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    k = len(spec["freq"])
    freq = spec["freq"] * rng.uniform(0.9, 1.1, (n, 1, 1, k)) * 2 * np.pi
    angle = spec["angle"] + rng.normal(0, 0.05, (n, 1, 1, k))
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1, k))
    wave = np.sin(freq * (xx[..., None] * np.cos(angle) + yy[..., None] * np.sin(angle)) + phase).sum(-1) / math.sqrt(k)
    alpha = 1 / (1 + np.exp(-spec["sharpness"] * wave))[..., None]
    colours = spec["colours"] + rng.normal(0, 30, (n, 2, 3))
    images = colours[:, None, None, 0] * (1 - alpha) + colours[:, None, None, 1] * alpha
    return images + rng.normal(0, rng.uniform(0, 15, (n, 1, 1, 1)), images.shape)


def _leaves_class(rng: np.random.Generator) -> dict:
    """A dead-leaves formula: a leaf shape, a power law of leaf sizes, a palette of 3-6 colours drawn as natural
    images' colours vary (luminance more than chroma) and the spectral slope of a 1/f noise texture."""
    k = rng.integers(3, 7)
    luminance = rng.uniform(20, 235, (k, 1))
    chroma = rng.normal(0, 25, (k, 3))
    chroma -= chroma.mean(1, keepdims=True)  # opponent colour: no change of luminance
    return {"shape": int(rng.integers(3)), "alpha": rng.uniform(2.0, 3.5), "palette": luminance + chroma,
            "beta": rng.uniform(1.0, 2.5), "texture": rng.uniform(5, 30)}


def _one_over_f(rng: np.random.Generator, beta: float, n: int) -> np.ndarray:
    """``n`` noise fields of unit variance whose power falls as ``1 / f**beta``."""
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(SIZE), np.fft.fftfreq(SIZE), indexing="ij"))
    f[0, 0] = np.inf  # no mean
    spectrum = np.fft.fft2(rng.normal(size=(n, SIZE, SIZE))) * f ** (-beta / 2)
    field = np.fft.ifft2(spectrum).real
    return field / field.std((1, 2), keepdims=True)


def _render_leaves(rng: np.random.Generator, spec: dict, n: int) -> np.ndarray:
    """LEAVES_PER_IMAGE leaves painted back to front, sizes from the class's power law (scale invariance),
    colours from its palette, over its 1/f luminance texture."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    palette = spec["palette"]
    images = palette[rng.integers(len(palette), size=n)][:, None, None] + np.zeros((n, SIZE, SIZE, 3))
    low, high, a = 1.5 ** (1 - spec["alpha"]), 16.0 ** (1 - spec["alpha"]), 1 - spec["alpha"]
    for _ in range(LEAVES_PER_IMAGE):
        radius = (low + rng.uniform(0, 1, (n, 1, 1)) * (high - low)) ** (1 / a)
        cy, cx = rng.uniform(-4, SIZE + 4, (2, n, 1, 1))
        angle = rng.uniform(0, np.pi, (n, 1, 1))
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = (yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle)
        if spec["shape"] == 0:
            dist = np.hypot(u, v)
        elif spec["shape"] == 1:
            dist = np.maximum(np.abs(u), np.abs(v))
        else:
            dist = np.hypot(u, v * rng.uniform(1.5, 3, (n, 1, 1)))
        alpha = np.clip(radius - dist + 0.5, 0, 1)[..., None]
        colour = palette[rng.integers(len(palette), size=n)][:, None, None] + rng.normal(0, 8, (n, 1, 1, 3))
        images = images * (1 - alpha) + colour * alpha
    return images + spec["texture"] * _one_over_f(rng, spec["beta"], n)[..., None]


FAMILIES = {
    "fractals": (_fractal_class, _render_fractals),
    "contours": (_contour_class, _render_contours),
    "strokes": (_stroke_class, _render_strokes),
    "textures": (_texture_class, _render_textures),
    "leaves": (_leaves_class, _render_leaves),
}


def make_dataset(counts: dict[str, int], per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 32, 32, 3], labels [N])``: ``counts[family]`` classes of each family, class by class."""
    images, labels = [], []
    label = 0
    for index, (family, count) in enumerate(counts.items()):
        draw, render = FAMILIES[family]
        for c in range(count):
            rng = np.random.default_rng([seed, index, c])
            images.append(np.clip(render(rng, draw(rng), per_class), 0, 255).round().astype(np.uint8))
            labels.append(np.full(per_class, label))
            label += 1
    return np.concatenate(images), np.concatenate(labels)


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


def random_views(images: torch.Tensor, generator: torch.Generator, grey_share: float) -> torch.Tensor:
    """A random crop of 50-100% of each image (aspect 3/4-4/3) resized back, brightness/contrast jittered,
    ``grey_share`` of them grey-scaled and half seen at 6-16 pixels upscaled back bicubically."""
    n = images.shape[0]
    area = torch.empty(n).uniform_(MIN_CROP_AREA, 1.0, generator=generator)
    aspect = torch.exp(torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator))
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(n, generator=generator) * (1 - w) + w / 2) * 2 - 1
    cy = (torch.rand(n, generator=generator) * (1 - h) + h / 2) * 2 - 1
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    views = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    contrast = torch.empty(n, 1, 1, 1).uniform_(0.8, 1.2, generator=generator)
    brightness = torch.empty(n, 1, 1, 1).uniform_(-0.1, 0.1, generator=generator)
    grey = torch.rand(n, 1, 1, 1, generator=generator) < grey_share
    views = torch.where(grey, views.mean(1, keepdim=True).expand_as(views), views)
    low = int(torch.randint(6, 17, (1,), generator=generator))
    small = F.interpolate(F.interpolate(views, size=low, mode="area"), size=SIZE, mode="bicubic", align_corners=False)
    views = torch.where(torch.rand(n, 1, 1, 1, generator=generator) < LOW_RES_SHARE, small, views)
    mean = views.mean((1, 2, 3), keepdim=True)
    return (views - mean) * contrast + mean + brightness


def patch_pixels(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, N, 3*p*p]``: each patch's pixels, patches in the order of the ViT's patch tokens (row-major), each
    flattened channel-major as the patch embedding's weights read them: the reconstruction target of token n."""
    return F.unfold(images, patch, stride=patch).transpose(1, 2)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    counts = {family: getattr(args, family) for family in FAMILIES}  # each family's --<family> class count
    images, labels = make_dataset(counts, args.per_class, args.seed)
    num_classes = int(labels.max()) + 1
    print(f"generated {len(images)} images of {num_classes} formula classes {counts} in "
          f"{time.perf_counter() - start:.0f} s")

    model_kwargs = {"img_size": SIZE, "patch_size": args.patch_size, "depth": args.depth}
    model = timm.create_model(args.backbone, pretrained=False, num_classes=num_classes, **model_kwargs)
    if args.freeze_patch_embed:  # MoCo v3 (Chen et al., ICCV 2021): a fixed random patch projection
        model.patch_embed.requires_grad_(False)
    config = resolve_data_config(model=model)  # the normalisation inca's Backbone will apply
    mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["std"]).view(1, 3, 1, 1)
    data = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
    targets = torch.from_numpy(labels)

    patch = args.patch_size
    decoder = torch.nn.Linear(model.embed_dim, 3 * patch * patch)  # patch tokens -> their view's pixels
    groups = param_groups_weight_decay(model, args.weight_decay, no_weight_decay_list=model.no_weight_decay())
    groups += param_groups_weight_decay(decoder, args.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    total = args.steps

    def schedule(step: int) -> float:  # total is known (calibrated) before the warm-up ends
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - args.warmup_steps) / max(1, total - args.warmup_steps))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(args.seed)
    deadline = start + args.minutes * 60 - SAVE_SECONDS
    model.train()
    step, losses, reconstruction, correct, seen, train_start = 0, [], [], 0, 0, time.perf_counter()
    while total == 0 or step < total:
        for index in torch.randperm(len(data), generator=generator).split(args.batch_size):
            if (total and step == total) or time.perf_counter() > deadline:
                break
            x = random_views(data[index].float() / 255, generator, args.grey_share)
            x = (x - mean) / std
            tokens = model.forward_features(x)
            logits = model.forward_head(tokens)
            loss = F.cross_entropy(logits, targets[index], label_smoothing=args.label_smoothing)
            pixels = patch_pixels(x, patch)
            error = F.mse_loss(decoder(tokens[:, model.num_prefix_tokens:]), pixels)
            optimizer.zero_grad(set_to_none=True)
            (loss + args.reconstruction * error).backward()
            torch.nn.utils.clip_grad_norm_([*model.parameters(), *decoder.parameters()], MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            reconstruction.append(error.item())
            correct += int((logits.argmax(-1) == targets[index]).sum())
            seen += len(index)
            step += 1
            if total == 0 and step == CALIBRATION_STEPS:
                per_step = (time.perf_counter() - train_start) / step
                total = max(step + 1, int(0.95 * (deadline - time.perf_counter()) / per_step) + step)  # 5% margin
                print(f"{per_step:.2f} s per step: {total} steps fit the {args.minutes:g}-minute budget "
                      f"(repeat this run exactly with --steps {total})", flush=True)
            if step % 100 == 0:
                print(f"step {step}/{total or '?'}: loss {np.mean(losses[-100:]):.3f}, train accuracy "
                      f"{correct / seen:.3f}, reconstruction error {np.mean(reconstruction[-100:]):.3f}, "
                      f"{time.perf_counter() - start:.0f} s", flush=True)
                correct = seen = 0
        if time.perf_counter() > deadline:
            break
    finished = step == total
    if not finished:
        print(f"warning: the {args.minutes:g}-minute budget ran out after {step} of {total} steps (the schedule "
              "did not finish)")

    model.reset_classifier(0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    record = {
        "backbone": args.backbone,
        "model_kwargs": model_kwargs,
        "pretraining": {
            "data": "formula-driven (FractalDB-style fractals, radial contours, Bezier strokes, wave textures, "
                    "dead leaves), generated offline",
            "objective": "formula classes + reconstruction of the view's pixels from the last block's patch tokens",
            "classes": counts, "images_per_class": args.per_class, "steps": step, "planned_steps": total,
            "calibrated": args.steps == 0, "finished": finished, "batch_size": args.batch_size, "lr": args.lr,
            "weight_decay": args.weight_decay, "warmup_steps": args.warmup_steps,
            "label_smoothing": args.label_smoothing, "reconstruction": args.reconstruction,
            "grey_share": args.grey_share, "freeze_patch_embed": args.freeze_patch_embed, "seed": args.seed,
            "threads": torch.get_num_threads(),
            "final_loss": float(np.mean(losses[-100:])) if losses else None,
            "final_reconstruction_error": float(np.mean(reconstruction[-100:])) if reconstruction else None,
            "seconds": round(time.perf_counter() - start),
        },
    }
    (out / "config.json").write_text(json.dumps(record, indent=2) + "\n")
    kwargs = " ".join(f"{k}={v}" for k, v in model_kwargs.items())
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'} ({step} steps, "
          f"{time.perf_counter() - start:.0f} s in all); use it with:")
    print(f"  --backbone {args.backbone} --weights {out / 'model.safetensors'} --model-kwargs {kwargs}")


if __name__ == "__main__":
    main()
