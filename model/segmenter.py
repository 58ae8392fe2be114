"""Per-pixel class probabilities and labels for uint8 RGB images of any size: what the scanner's
inference queue calls.

Images of exactly ``window``×``window`` (the scanner's tiles) go through the network in batches.
Any other size is cut into overlapping windows (smaller images are first reflect-padded up to the
window) and the windows' probabilities are blended with weights that fall off smoothly over the
``overlap`` towards a neighbouring window and stay 1 at the image's own border, so neither seams
nor darkened edges appear.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any, get_args

import numpy as np
import torch
from torch import nn

from model.checkpoint import CLASS_NAMES, Checkpoint, load_checkpoint
from model.inference_net import fold_batch_norm, fold_for_inference
from model.unet import UNet
from model.unet.reference import (
    ContrastReference,
    Substrate,
    contrast_scale,
    is_mirrored,
    mirrored_references,
    substrate_reference,
)

Window = tuple[int, int, torch.Tensor]  # top, left, window×window blending weight
#: contrast references of images on the device: colours and the contrast's factor (or None)
References = tuple[torch.Tensor, torch.Tensor | None]
#: largest result predict() page-locks: 64 tiles' probabilities (3 × 512² float32 each)
PINNED_MAX_BYTES = 64 * 3 * 512 * 512 * 4
#: batches whose results may wait on the GPU at once while predict pipelines (`_pipelined`)
IN_FLIGHT = 3
# Nets trained against `bright` are read against `hue`: the same wherever the substrate is most
# of the field (191 of 192 held-out synthetic tiles, 96 % of training crops), and the
# substrate's own colour where a film hides it from `bright` (model/unet/reference.py). The
# shipped model on the real set: 0.645 -> 0.715 mean per-class accuracy; a second training run
# of its recipe 0.557 -> 0.625.
READ_AS: dict[str, ContrastReference] = {"bright": "hue"}


class Segmenter:
    """Runs a U-Net for inference: eval mode, no autograd, batches, optional autocast and compile.

    Works on its own inference copy of the model (batch norm folded into the convolutions), so
    later changes to ``model``'s weights are not seen; build a new Segmenter after training.
    ``scale`` maps uint8 pixels to the network's input range (the checkpoint's normalisation).
    ``class_weights``: the weights of a class-weighted training loss (one per network output),
    to divide back out. Such a loss trains the net to output p(c | x)·w_c (normalised), which
    favours rare classes: right for the paper's mean per-class accuracy, but a scan is mostly
    bare substrate and wants the plain posterior, or every unsure patch of oxide becomes a
    monolayer. A net that learnt parts of `other` apart (``UNetConfig.other_outputs``) has their
    probabilities summed into `other`, after the weights are divided out.
    ``reference``: the rule that finds each image's contrast reference (`reference_colours`);
    None: the net's own, except that `bright` nets are read with `hue` (READ_AS).
    ``image_reference``: take each window's optical contrast against the whole image's reference
    rather than the window's own (images larger than the window, or padded). None: on for the
    `bright` and `hue` references, off for the others. Measured on the real set (772 × 688 px):
    the earlier shipped `bright` model 0.585 → 0.645 mean per-class accuracy; a `small-lab` net
    (`median` reference, raw colour) trained on 25 real images 0.807 → 0.779 on the other 84, so
    it stays off there.
    ``substrate``: what the flakes lie on (`substrate_reference`): `oxide`, `transparent`
    (quartz, sapphire: layers brighter than the substrate, read mirrored onto the oxide's
    contrast), or `auto`, decided per image (for an image larger than the window, on the whole
    image: each window then finds its own colours, mirrored or not as the image is). None:
    `auto` for nets read with `hue` that take only the optical contrast of RGB images (such as
    the shipped model, trained on synthetic oxide: on the real set 0.715 → 0.795 mean
    per-class accuracy, the dark-background images read), `oxide` for the others;
    `from_checkpoint` reads a net trained mirrored (``TrainConfig.substrate`` `auto`, the `lab`
    recipes) with `auto` (`substrate_read_as`), and cross-validation and training's validation
    read their nets as it would (`model.evaluate.reading_for`).
    ``amp`` (autocast) defaults to on for CUDA — bf16 where supported, else fp16 — and is refused
    on the CPU, where it would change results for little gain.
    """

    def __init__(
        self,
        model: UNet,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        amp: bool | None = None,
        channels_last: bool = True,
        compile: bool = False,
        window: int = 512,
        overlap: int = 64,
        scale: float = 1 / 255,
        class_weights: Sequence[float] | None = None,
        image_reference: bool | None = None,
        reference: ContrastReference | None = None,
        substrate: Substrate | None = None,
    ) -> None:
        config = model.config
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if window < 1 or window % config.multiple:
            raise ValueError(
                f"window {window} must be a positive multiple of 2**depth = {config.multiple}"
            )
        if not 0 <= overlap < window:
            raise ValueError(f"overlap must be in [0, window={window}), got {overlap}")
        self.device = torch.device(device)
        if amp is None:
            amp = self.device.type == "cuda"
        if amp and self.device.type != "cuda":
            raise ValueError("amp (autocast) is only used on CUDA; pass amp=False or None on CPU")
        self.amp_dtype: torch.dtype | None = None
        if amp:
            bf16 = torch.cuda.is_bf16_supported()
            self.amp_dtype = torch.bfloat16 if bf16 else torch.float16
        self.config = config
        if reference is None:
            reference = READ_AS.get(config.contrast_reference, config.contrast_reference)
        rules = get_args(ContrastReference)
        if reference not in rules:
            raise ValueError(
                f"{reference!r} is not a contrast reference; choose from {', '.join(rules)}"
            )
        #: the rule the contrast reference is found by here (the net's own, or READ_AS's)
        self.reference: ContrastReference = reference
        reads_rgb_contrast = config.reads_rgb_contrast
        if substrate is None:
            auto = reads_rgb_contrast and reference == "hue" and not config.input_raw
            substrate = "auto" if auto else "oxide"
        if substrate not in get_args(Substrate):
            raise ValueError(
                f"{substrate!r} is not a substrate; choose from {', '.join(get_args(Substrate))}"
            )
        if substrate != "oxide" and not reads_rgb_contrast:
            raise ValueError(
                f"substrate {substrate!r} is read from the optical contrast of RGB images; this "
                "net does not take it"
            )
        #: what the flakes are read as lying on (`substrate_reference`)
        self.substrate: Substrate = substrate
        if image_reference is None:
            image_reference = reference in ("bright", "hue")
        self.image_reference = image_reference and config.input_contrast
        self.batch_size = batch_size
        self.channels_last = channels_last
        self.window = window
        self.overlap = overlap
        self.scale = scale
        self._class_weights: torch.Tensor | None = None
        if class_weights is not None:
            w = torch.as_tensor(list(class_weights), dtype=torch.float32)
            if w.shape != (config.outputs,) or not bool((w >= 0).all()) or not bool(w.any()):
                raise ValueError(
                    f"class_weights must be {config.outputs} non-negative numbers, not all 0 (one "
                    f"per network output), got {list(w)}"
                )
            # 0 marks a class absent from the training masks (median_frequency_weights): the
            # loss never weighted it, so there is nothing to divide out.
            w = torch.where(w > 0, w, torch.ones_like(w))
            self._class_weights = w.view(1, -1, 1, 1).to(self.device)
        self.checkpoint: Checkpoint | None = None
        self.class_names: tuple[str, ...] = (
            CLASS_NAMES
            if config.classes == len(CLASS_NAMES)
            else tuple(map(str, range(config.classes)))
        )

        # On CUDA each convolution and its ReLU run as one cuDNN kernel, in the autocast dtype.
        cuda = self.device.type == "cuda"
        net = fold_for_inference(model, fuse_relu=cuda, dtype=self.amp_dtype).to(self.device)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        self._eager: nn.Module = net
        self._compiled: Callable[..., torch.Tensor] | None = None
        if compile:
            try:
                self._compiled = torch.compile(net)
            except Exception as exc:  # e.g. a Python version torch.compile does not support yet
                warnings.warn(f"torch.compile unavailable ({exc}); running eagerly", stacklevel=2)

    @property
    def reference_overridden(self) -> bool:
        """Whether the contrast reference is found by another rule than the net trained with."""
        return self.config.input_contrast and self.reference != self.config.contrast_reference

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike[str], *, plain_posterior: bool = False, **kwargs: Any
    ) -> Segmenter:
        """A Segmenter for a saved model, with the checkpoint's normalisation and class names.

        ``plain_posterior``: divide out the class weights the checkpoint was trained with (none
        for an unweighted loss), so probabilities and labels are the plain posterior.
        """
        model, meta = load_checkpoint(path, device=kwargs.get("device", "cpu"))
        if kwargs.get("substrate") is None:  # read as it trained
            trained = (meta.training.get("config") or {}).get("substrate", "oxide")
            kwargs["substrate"] = substrate_read_as(str(trained))
        if plain_posterior:
            kwargs.setdefault("class_weights", meta.training.get("class_weights"))
        unknown = set(meta.normalisation) - {"scale"}
        if unknown:
            raise ValueError(f"{path}: normalisation {sorted(unknown)} is not supported")
        kwargs.setdefault("scale", meta.normalisation.get("scale", 1 / 255))
        segmenter = cls(model, **kwargs)
        segmenter.checkpoint = meta
        segmenter.class_names = meta.class_names
        return segmenter

    @torch.inference_mode()
    def predict(
        self,
        tiles: np.ndarray,
        references: np.ndarray | None = None,
        transparent: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and labels for N×H×W×3 (or one H×W×3) uint8 images.

        Returns ``(probabilities, labels)``: N×classes×H×W float32 summing to 1 over the class
        axis (the model's and torch's layout), and N×H×W uint8 argmax labels (0 other,
        1 monolayer, 2 bilayer). A single image gives classes×H×W and H×W.

        ``references``: N×C colours (C for a single image), in the net's input scale, to take
        each image's optical contrast against, in every window of it, instead of the one its
        own pixels give: the scanner passes the chip's oxide colour for tiles a film fills.
        Each image's own (``references``) give predict's own result for window-sized tiles,
        and for larger images where the whole image's reference is used (``image_reference``).
        Only for nets that take the optical contrast.
        ``transparent`` (N booleans, with ``references``): which of those colours are a
        transparent substrate's, to read mirrored (`substrate_references` gives both). Without
        it, each image's own decision (`auto`; for a larger image, the whole image's), all
        (`transparent`) or none (`oxide`): pass it with colours from elsewhere (the chip's),
        or a tile that alone looks transparent is read mirrored against them.
        """
        images, single = self._as_batch(tiles)
        n, height, width, _ = images.shape
        given = None
        if references is not None:
            if transparent is None and self.substrate == "auto":
                transparent = self.substrate_references(images)[1]
            given = self._given_references(references, n, transparent)
        elif transparent is not None:
            raise ValueError(
                "transparent says which of the given references are mirrored: give "
                "references with it"
            )
        probs = self._host_empty((n, self.config.classes, height, width), torch.float32)
        labels = self._host_empty((n, height, width), torch.uint8)
        if n == 0:
            return probs, labels
        padded = _pad_to(images, self.window)
        windows = _windows(padded.shape[1], padded.shape[2], self.window, self.overlap, self.device)
        # A window (or a padded image) holds more or less than the image: its contrast is taken
        # against the whole image's reference, which more often has substrate in it.
        whole = len(windows) == 1 and padded.shape == images.shape
        refs = given
        if refs is None and not whole and self.image_reference:
            refs = self._references(images)
        mirrored = None
        if refs is None and not whole and self.substrate == "auto":
            # Each window finds its own colours, but whether it is read mirrored is decided
            # on the whole image, as training decides it: a window of a quartz image that is
            # mostly bare substrate cannot tell on its own.
            mirrored = self.substrate_references(images)[1]
        if len(windows) == 1 and self.device.type == "cuda":
            self._pipelined(padded, refs, probs, labels, mirrored)  # crops to each image's size
        elif len(windows) == 1:
            for b in range(0, n, self.batch_size):
                part = slice(b, b + self.batch_size)
                p = self._infer(padded[part], _pick(refs, part), _part(mirrored, part))
                p = p[:, :, :height, :width]
                torch.from_numpy(probs[b : b + len(p)]).copy_(p)
                torch.from_numpy(labels[b : b + len(p)]).copy_(_argmax(p, dim=1))
        else:
            self._blend(padded, windows, probs, labels, refs, mirrored)
        return (probs[0], labels[0]) if single else (probs, labels)

    def _pipelined(
        self,
        tiles: np.ndarray,
        refs: References | None,
        probs: np.ndarray,
        labels: np.ndarray,
        mirrored: np.ndarray | None = None,
    ) -> None:
        """Window-sized tiles on CUDA, batch by batch, with each batch's upload and its
        results' copy back overlapping the network's work on its neighbours.

        Uploads go from a page-locked staging buffer (two, used in turn) on a copy stream;
        results come back on another into ``probs`` and ``labels`` (page-locked where
        `_host_empty` could). At most IN_FLIGHT batches' results wait on the device at once.
        """
        device, bs = self.device, self.batch_size
        compute = torch.cuda.current_stream(device)
        upload, download = torch.cuda.Stream(device), torch.cuda.Stream(device)
        staging = [
            torch.empty((min(bs, len(tiles)), *tiles.shape[1:]), dtype=torch.uint8, pin_memory=True)
            for _ in range(2)
        ]
        staged: list[torch.cuda.Event | None] = [None, None]
        returned: list[torch.cuda.Event] = []
        try:
            for k, b in enumerate(range(0, len(tiles), bs)):
                chunk, part = tiles[b : b + bs], slice(b, b + bs)
                buffer = staging[k % 2][: len(chunk)]
                if staged[k % 2] is not None:
                    staged[k % 2].synchronize()  # its last upload has left the buffer
                buffer.numpy()[...] = chunk
                with torch.cuda.stream(upload):
                    x = buffer.to(device, non_blocking=True)
                    staged[k % 2] = upload.record_event()
                compute.wait_stream(upload)
                x.record_stream(compute)
                x = self._scaled(x)
                p = self._infer_input(x, _pick(refs, part), _part(mirrored, part))
                p = p[:, :, : labels.shape[1], : labels.shape[2]]  # a padded image's own part
                label = _argmax(p, dim=1)
                download.wait_stream(compute)
                with torch.cuda.stream(download):
                    p.record_stream(download)
                    label.record_stream(download)
                    torch.from_numpy(probs[b : b + len(chunk)]).copy_(p, non_blocking=True)
                    torch.from_numpy(labels[b : b + len(chunk)]).copy_(label, non_blocking=True)
                    returned.append(download.record_event())
                if len(returned) >= IN_FLIGHT:
                    returned.pop(0).synchronize()
        finally:
            # Also on an error: no copy may still be writing into memory handed back.
            download.synchronize()

    def references(self, tiles: np.ndarray) -> np.ndarray:
        """N×C float32 (C for one image): each image's own contrast reference, by this
        Segmenter's rule (``reference``, and ``substrate``), in the net's input scale."""
        return self.substrate_references(tiles)[0]

    def substrate_references(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``references`` and, per image (N booleans, or one), whether it is read as on a
        transparent substrate: what ``predict`` takes as ``references`` and ``transparent``."""
        self._need_contrast("references")
        images, single = self._as_batch(tiles)
        if len(images) == 0:
            return np.empty((0, self.config.in_channels), np.float32), np.empty(0, bool)
        tiles = images.shape[1:3] == (self.window, self.window)
        with torch.inference_mode():  # tiles in batches, as predict reads them
            refs, scale = self._references(images, self.batch_size if tiles else 1)
        colours = refs.flatten(1).float().cpu().numpy()
        transparent = np.zeros(len(colours), bool)
        if scale is not None:
            transparent = is_mirrored(scale).cpu().numpy()
        return (colours[0], transparent[0]) if single else (colours, transparent)

    def _need_contrast(self, what: str) -> None:
        if not self.config.input_contrast:
            raise ValueError(
                f"{what}: this net takes raw pixels (input_contrast is off); it has no contrast "
                "reference"
            )

    def _given_references(
        self, references: np.ndarray, n: int, transparent: np.ndarray | None
    ) -> References:
        """predict()'s ``references`` and ``transparent`` checked, as N×C×1×1 on the device."""
        self._need_contrast("references")
        refs = np.asarray(references, dtype=np.float32)
        refs = refs[None] if refs.ndim == 1 else refs
        if refs.shape != (n, self.config.in_channels):
            raise ValueError(
                f"references: expected {n}×{self.config.in_channels} (one colour per image), "
                f"got shape {np.shape(references)}"
            )
        # 0 is allowed (a black tile's own): the contrast clamps its reference above 0.
        if not np.isfinite(refs).all() or (refs < 0).any():
            raise ValueError("references must be finite colours of 0 or more (0..1 scale)")
        colours = torch.from_numpy(refs).to(self.device)[:, :, None, None]
        if transparent is None:
            transparent = np.full(n, self.substrate == "transparent")
        transparent = np.asarray(transparent)
        if transparent.dtype != bool or transparent.shape not in ((n,), ()):
            raise ValueError(f"transparent: expected {n} booleans, got {transparent!r}")
        if not transparent.any():
            return colours, None
        if self.substrate == "oxide":
            raise ValueError("transparent references given to a Segmenter read on oxide")
        picked = torch.from_numpy(np.broadcast_to(transparent, (n,)).copy())
        return colours, contrast_scale(picked, colours)

    def _host_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> np.ndarray:
        """A result array; from a GPU, in page-locked memory, which the GPU copies into ~50×
        faster than into ordinary memory (H100: 0.06 against 4.6 ms per tile's probabilities).

        The array keeps its torch buffer alive. Torch keeps freed page-locked buffers for reuse
        and never hands them back to the system, so only results up to PINNED_MAX_BYTES (a
        scanner batch) are page-locked; one huge image must not pin its size for good.
        """
        nbytes = math.prod(shape) * dtype.itemsize
        pinned = self.device.type == "cuda" and nbytes <= PINNED_MAX_BYTES
        return torch.empty(shape, dtype=dtype, pin_memory=pinned).numpy()

    def _references(self, images: np.ndarray, batch: int = 1) -> References:
        """N×C×1×1 contrast references of whole images and their factors, on the device,
        ``batch`` images at a time (one for large images: their float copy is the memory that
        matters)."""
        parts = [
            self._own_references(self._to_input(images[b : b + batch]))
            for b in range(0, len(images), batch)
        ]
        colours = torch.cat([c for c, _ in parts])
        if all(s is None for _, s in parts):
            return colours, None
        return colours, torch.cat([torch.ones_like(c) if s is None else s for c, s in parts])

    def _own_references(self, x: torch.Tensor) -> References:
        return substrate_reference(x, self.reference, self.substrate)

    def _blend(
        self,
        padded: np.ndarray,
        windows: list[Window],
        probs: np.ndarray,
        labels: np.ndarray,
        refs: References | None,
        mirrored: np.ndarray | None = None,
    ) -> None:
        win = self.window
        weight_sum = torch.zeros(padded.shape[1:3], device=self.device)
        for y, x, w in windows:
            weight_sum[y : y + win, x : x + win] += w
        # Windows in image order, so each image's sum is finished before the next one starts.
        jobs = [(i, *window) for i in range(len(padded)) for window in windows]
        current, acc = -1, torch.empty(0)
        for b in range(0, len(jobs), self.batch_size):
            chunk = jobs[b : b + self.batch_size]
            crops = np.stack([padded[i, y : y + win, x : x + win] for i, y, x, _ in chunk])
            images = [i for i, *_ in chunk]
            p = self._infer(crops, _pick(refs, images), _part(mirrored, images))
            for k, (i, y, x, w) in enumerate(chunk):
                if i != current:
                    if current >= 0:
                        self._finish(acc / weight_sum, current, probs, labels)
                    current = i
                    acc = torch.zeros((self.config.classes, *weight_sum.shape), device=self.device)
                acc[:, y : y + win, x : x + win].addcmul_(p[k], w)
        self._finish(acc / weight_sum, current, probs, labels)

    @staticmethod
    def _finish(p: torch.Tensor, i: int, probs: np.ndarray, labels: np.ndarray) -> None:
        p = p[:, : labels.shape[1], : labels.shape[2]]
        torch.from_numpy(probs[i]).copy_(p)
        torch.from_numpy(labels[i]).copy_(_argmax(p, dim=0))

    def _infer(
        self,
        crops: np.ndarray,
        refs: References | None = None,
        mirrored: np.ndarray | None = None,
    ) -> torch.Tensor:
        """B×win×win×3 uint8 -> B×classes×win×win float32 probabilities on the device;
        ``refs``: the contrast references of the images they come from (None: their own);
        ``mirrored``: without ``refs``, which crops come from images decided transparent."""
        return self._infer_input(self._to_input(crops), refs, mirrored)

    def _infer_input(
        self, x: torch.Tensor, refs: References | None, mirrored: np.ndarray | None = None
    ) -> torch.Tensor:
        """`_infer` for an input already on the device, in the net's range."""
        if refs is None and mirrored is not None:
            flags = torch.from_numpy(np.ascontiguousarray(mirrored)).to(self.device)
            refs = mirrored_references(x, self.reference, flags)
        elif refs is None and (self.reference_overridden or self.substrate != "oxide"):
            refs = self._own_references(x)
        colours, scale = (None, None) if refs is None else refs
        p = torch.softmax(self.logits(x, colours, scale).float(), dim=1)
        if self._class_weights is not None:
            p = p / self._class_weights
            p = p / p.sum(dim=1, keepdim=True)
        classes = self.config.classes
        if p.shape[1] > classes:  # the parts of `other` learnt apart (UNetConfig.other_outputs)
            other = p[:, :1] + p[:, classes:].sum(dim=1, keepdim=True)
            p = torch.cat([other, p[:, 1:classes]], dim=1)
        return p

    def _to_input(self, crops: np.ndarray) -> torch.Tensor:
        """B×H×W×3 uint8 -> B×3×H×W floats in the net's input range, on the device."""
        # uint8 crosses to the device (a quarter of the bytes of float32); the permuted view is
        # already channels-last in memory.
        crops = np.ascontiguousarray(crops)
        if not crops.flags.writeable:  # PIL hands out read-only arrays; torch warns on them
            crops = crops.copy()
        return self._scaled(torch.from_numpy(crops).to(self.device, non_blocking=True))

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        """B×H×W×3 uint8 on the device -> B×3×H×W floats in the net's input range."""
        x = x.permute(0, 3, 1, 2).float().mul_(self.scale)
        return x if self.channels_last else x.contiguous()

    def logits(
        self,
        x: torch.Tensor,
        refs: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The inference net's raw outputs for a ready input on the device (N×C×H×W floats in
        the net's input range), under the Segmenter's autocast; ``refs``: contrast references
        (None: each input's own, as the net trained), ``scale`` their contrast factors.
        ``predict`` builds on it; benchmarks time it alone."""
        autocast = (
            torch.autocast("cuda", dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            return self._forward(x, refs, scale)

    def _forward(
        self, x: torch.Tensor, refs: torch.Tensor | None, scale: torch.Tensor | None
    ) -> torch.Tensor:
        args = (x,) if refs is None else (x, refs) if scale is None else (x, refs, scale)
        if self._compiled is not None:
            try:
                return self._compiled(*args)
            except Exception as exc:  # compile errors surface on the first call, not at compile()
                warnings.warn(f"compiled model failed ({exc}); running eagerly", stacklevel=3)
                self._compiled = None
        return self._eager(*args)

    def _as_batch(self, tiles: np.ndarray) -> tuple[np.ndarray, bool]:
        c = self.config.in_channels
        if not isinstance(tiles, np.ndarray):
            raise TypeError(f"expected a numpy uint8 array, got {type(tiles).__name__}")
        if tiles.dtype != np.uint8:
            raise TypeError(f"expected uint8 pixels (0..255), got {tiles.dtype}")
        if tiles.ndim not in (3, 4) or tiles.shape[-1] != c:
            raise ValueError(
                f"expected N×H×W×{c} or H×W×{c} (channels last), got shape {tiles.shape}"
            )
        if 0 in tiles.shape[-3:-1]:
            raise ValueError(f"image of zero size: shape {tiles.shape}")
        single = tiles.ndim == 3
        return (tiles[None] if single else tiles), single


def substrate_read_as(trained: str) -> Substrate | None:
    """The Segmenter's ``substrate`` for a net trained with ``TrainConfig.substrate``
    ``trained``: `auto` for a net trained mirrored; else None, the Segmenter's own default
    (`auto` for `hue` nets of RGB contrast, which read quartz mirrored untrained)."""
    return "auto" if trained == "auto" else None


def _pick(refs: References | None, index: Sequence[int] | slice) -> References | None:
    if refs is None:
        return None
    colours, scale = refs
    return colours[index], None if scale is None else scale[index]


def _part(mirrored: np.ndarray | None, index: Sequence[int] | slice) -> np.ndarray | None:
    return None if mirrored is None else mirrored[index]


def _pad_to(images: np.ndarray, window: int) -> np.ndarray:
    """Reflect-pad bottom and right up to the window where an image is smaller than it."""
    _, h, w, _ = images.shape
    if h >= window and w >= window:
        return images
    return np.pad(
        images, ((0, 0), (0, max(window - h, 0)), (0, max(window - w, 0)), (0, 0)), "reflect"
    )


def _starts(length: int, window: int, overlap: int) -> list[int]:
    """Evenly spread window offsets covering ``length``, neighbours sharing at least ``overlap``."""
    if length <= window:
        return [0]
    n = math.ceil((length - window) / (window - overlap)) + 1
    return [round(v) for v in np.linspace(0, length - window, n)]


def _windows(
    height: int, width: int, window: int, overlap: int, device: torch.device
) -> list[Window]:
    """(y, x, weight) of each window. A weight is 1 but for a raised-cosine ramp over the
    ``overlap`` pixels towards each neighbouring window; the ramp is sampled at pixel centres so it
    is never 0, and a ramp and its mirror sum to 1 where two windows overlap by exactly
    ``overlap``. Edge and interior windows share at most nine distinct weights, built once."""
    pos = (torch.arange(overlap, dtype=torch.float64) + 0.5) / overlap
    ramp = torch.sin(0.5 * math.pi * pos) ** 2

    def profile(start: int, length: int) -> torch.Tensor:
        w = torch.ones(window, dtype=torch.float64)
        if overlap and start > 0:
            w[:overlap] = ramp
        if overlap and start + window < length:
            w[window - overlap :] = ramp.flip(0)
        return w

    cache: dict[tuple[bool, ...], torch.Tensor] = {}
    out: list[Window] = []
    for y in _starts(height, window, overlap):
        for x in _starts(width, window, overlap):
            key = (y > 0, y + window < height, x > 0, x + window < width)
            if key not in cache:
                w2 = torch.outer(profile(y, height), profile(x, width))
                cache[key] = w2.to(device=device, dtype=torch.float32)
            out.append((y, x, cache[key]))
    return out


def _argmax(p: torch.Tensor, dim: int) -> torch.Tensor:
    """uint8 argmax over the class axis, first class on ties, as torch.argmax; comparing classes
    pairwise is many times faster than argmax along a strided axis on the CPU."""
    best = p.select(dim, 0)
    labels = torch.zeros(best.shape, dtype=torch.uint8, device=p.device)
    for c in range(1, p.shape[dim]):
        pc = p.select(dim, c)
        labels.masked_fill_(pc > best, c)
        best = torch.maximum(best, pc)
    return labels


__all__ = ["Segmenter", "fold_batch_norm", "fold_for_inference"]
