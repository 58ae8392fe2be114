"""Inference speed of the U-Net presets on 512×512 tiles: CPU always, CUDA where there is one.

    python scripts/bench_inference.py [--presets paper small small-lab tiny] [--compile]
        [--seconds 3]

Per preset: GFLOP per tile (2 × conv multiply-adds), then tiles/s for ``Segmenter.predict`` on
uint8 tiles (what the scanner gets: upload, forward, softmax, argmax, copy back) and for the
model's forward alone on a ready input (the compute ceiling). On CUDA it also prints the
fraction of the GPU's dense bf16 peak that the forward reaches, counting the arithmetic the
Segmenter's folded net does (fewer FLOPs than the paper's layers: see ``fold_for_inference``).
Targets are printed beside the figures. Weights are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

import model.segmenter as segmenter_module
from model.inference_net import fold_for_inference
from model.segmenter import Segmenter
from model.unet import PRESETS, build_unet, count_gflops, gflops_per_tile

TILE = 512
# Dense bf16 tensor-core peaks, TFLOP/s, by a substring of the device name; first match wins.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
]
TARGETS = {
    ("paper", "cuda"): "target > 1000 tiles/s on an H100",
    ("small", "cpu"): "target ≥ 5 tiles/s on the 2-core CPU",
    ("small-lab", "cpu"): "target ≥ 5 tiles/s on the 2-core CPU",
}


def timed(
    fn: Callable[[], object],
    *,
    seconds: float,
    min_calls: int,
    warmup: bool,
    sync: Callable[[], None],
) -> float:
    """Median seconds per call over at least ``min_calls`` calls and ``seconds``."""
    if warmup:
        fn()
        sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def folded_gflops(preset: str) -> float:
    """GFLOP per tile of the net the Segmenter runs (``fold_for_inference``: up-convolutions
    as transposed convolutions, 9/16 of their arithmetic), counted on the meta device."""
    with torch.device("meta"):
        model = fold_for_inference(build_unet(PRESETS[preset]))
    return count_gflops(model, TILE)


def peak_tflops(name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def bench(
    preset: str, device: str, batch_sizes: list[int], args: argparse.Namespace
) -> list[tuple[int, float, float]]:
    """(batch size, predict tiles/s, forward tiles/s) per batch size."""
    config = PRESETS[preset]
    model = build_unet(config).eval()
    torch._dynamo.reset()  # presets share UNet.forward's code, and with it the compile cache
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # The paper net takes seconds per tile on a CPU: one call per figure, warm-up only once.
    slow = not cuda and gflops_per_tile(config) > 100
    compile_ = args.compile and cuda
    segmenter = Segmenter(model, device=device, compile=compile_)
    rows = []
    for k, bs in enumerate(batch_sizes):
        segmenter.batch_size = bs
        # predict pipelines a call's batches on CUDA: more tiles a call than a batch overlap
        # one batch's copies with its neighbours' work
        n = max(bs, args.tiles_per_call or bs)
        tiles = np.random.default_rng(0).integers(0, 256, (n, TILE, TILE, 3), dtype=np.uint8)
        with torch.inference_mode():  # as predict's inputs: one compiled graph serves both
            x = torch.rand(bs, 3, TILE, TILE, device=device)
            x = x.contiguous(memory_format=torch.channels_last)

        def run_forward() -> None:
            with torch.inference_mode():
                segmenter.logits(x)  # noqa: B023 - called before the loop moves on

        kw = {"seconds": 0.0 if slow else args.seconds, "min_calls": 1 if slow else 3}
        kw["warmup"] = k == 0 or not slow
        t_predict = timed(lambda: segmenter.predict(tiles), sync=sync, **kw)  # noqa: B023
        t_forward = timed(run_forward, sync=sync, **kw)
        rows.append((bs, n / t_predict, bs / t_forward))
        print(
            f"  {preset:9s} {device:4s} batch {bs:3d}: predict {n / t_predict:9.2f} tiles/s "
            f"({n} a call), "
            f"forward {bs / t_forward:9.2f} tiles/s",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--presets",
        nargs="+",
        default=["paper", "small", "small-lab", "tiny"],
        choices=sorted(PRESETS),
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--cpu-batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--cuda-batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument(
        "--tiles-per-call",
        type=int,
        default=None,
        help="tiles given to each predict call (default: one batch)",
    )
    parser.add_argument(
        "--pinned-max-tiles",
        type=int,
        default=None,
        help="page-lock predict's results up to this many tiles a call (default: "
        "model.segmenter.PINNED_MAX_BYTES, 64 tiles); above it they go to ordinary memory",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile on CUDA")
    parser.add_argument("--no-cpu", action="store_true")
    args = parser.parse_args()

    if args.pinned_max_tiles is not None:
        segmenter_module.PINNED_MAX_BYTES = args.pinned_max_tiles * 3 * TILE * TILE * 4
    # One static graph per batch size, as a scan with a fixed batch size runs; without this the
    # second size compiles a dynamic-shape graph that the later sizes share.
    torch._dynamo.config.automatic_dynamic_shapes = False
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    print(
        f"torch {torch.__version__}; CPU: {threads} threads (torch.get_num_threads() = "
        f"{torch.get_num_threads()})"
    )
    cuda_name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    peak = peak_tflops(cuda_name) if cuda_name else None
    if cuda_name:
        print(
            f"CUDA: {cuda_name}; dense bf16 peak {f'{peak:.0f} TFLOP/s' if peak else 'unknown'}; "
            f"bf16 autocast, channels_last, compile={args.compile}"
        )

    summary = []
    for preset in args.presets:
        gflop, run_gflop = gflops_per_tile(PRESETS[preset]), folded_gflops(preset)
        params = sum(p.numel() for p in build_unet(PRESETS[preset]).parameters())
        print(
            f"{preset}: {PRESETS[preset]!r}\n  {gflop:.2f} GFLOP per {TILE}×{TILE} tile "
            f"({run_gflop:.2f} as the Segmenter runs it), {params:,} parameters"
        )
        devices = ([] if args.no_cpu else ["cpu"]) + (["cuda"] if cuda_name else [])
        for device in devices:
            sizes = args.cuda_batch_sizes if device == "cuda" else args.cpu_batch_sizes
            for bs, predict, forward in bench(preset, device, sizes, args):
                summary.append((preset, device, bs, gflop, run_gflop, predict, forward))

    print(
        "\npreset     device  batch  GFLOP/tile  predict tiles/s  forward tiles/s  "
        "forward % of peak"
    )
    for preset, device, bs, gflop, run_gflop, predict, forward in summary:
        frac = "-"
        if device == "cuda":  # the arithmetic actually done, not the unfolded net's
            frac = f"{100 * forward * run_gflop / 1e3 / peak:.1f} %" if peak else "unknown"
        target = TARGETS.get((preset, device), "")
        print(
            f"{preset:10s} {device:6s} {bs:5d}  {gflop:10.2f}  {predict:15.2f}  {forward:15.2f}  "
            f"{frac:>17s}  {target}".rstrip()
        )


if __name__ == "__main__":
    main()
