"""Training loop: learns a toy task, is reproducible by seed, fine-tunes a given model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.segmenter import Segmenter
from model.train import RECIPES, TrainConfig, train
from model.unet import PRESETS, build_unet


def _toy_pairs(n: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    """Flat substrate with a 'monolayer' square and a 'bilayer' bar of distinct colours."""
    rng = np.random.default_rng(1)
    pairs = []
    for _ in range(n):
        mask = np.zeros((80, 80), np.uint8)
        r, c = rng.integers(5, 30, size=2)
        mask[r : r + 30, c : c + 30] = 1
        mask[r + 30 : r + 40, c : c + 30] = 2
        img = np.full((80, 80, 3), (182, 175, 226), np.uint8)
        img[mask == 1] = (90, 170, 120)
        img[mask == 2] = (30, 60, 250)
        pairs.append((img, mask))
    return pairs


CFG = TrainConfig(
    preset="tiny",
    epochs=6,
    samples_per_epoch=16,
    crop=64,
    batch_size=4,
    lr=1e-2,
    augment="none",
    seed=3,
    # The training logic on the CPU everywhere; tests/test_cuda.py covers the GPU.
    device="cpu",
)


def test_training_reduces_the_loss_and_reports_class_weights() -> None:
    _, reports, weights = train(_toy_pairs(), CFG)
    assert len(reports) == CFG.epochs
    assert reports[-1].train_loss < 0.8 * reports[0].train_loss
    # bilayer is the rarest class here, so median frequency balancing weighs it most
    assert weights is not None and weights[2] > weights[1] > weights[0]


def test_same_seed_same_run() -> None:
    cfg = CFG.model_copy(update={"epochs": 2})
    a = [r.train_loss for r in train(_toy_pairs(), cfg)[1]]
    b = [r.train_loss for r in train(_toy_pairs(), cfg)[1]]
    assert a == pytest.approx(b, rel=1e-5)


def test_fine_tuning_starts_from_the_given_weights() -> None:
    torch.manual_seed(0)
    start = build_unet(PRESETS["tiny"])
    first = next(iter(start.state_dict().values())).clone()
    model, _, _ = train(_toy_pairs(), CFG.model_copy(update={"epochs": 1}), model=start)
    assert model is start
    assert not torch.equal(next(iter(model.state_dict().values())), first)


def test_validation_hook_and_bad_inputs() -> None:
    seen = []
    train(
        _toy_pairs(2),
        CFG.model_copy(update={"epochs": 2}),
        validate=lambda m: seen.append(m.training) or {"val_mpa": 0.5},
    )
    assert len(seen) == 2
    with pytest.raises(ValueError, match="no training images"):
        train([], CFG)
    with pytest.raises(ValueError, match="unknown preset"):
        train(_toy_pairs(1), CFG.model_copy(update={"preset": "huge"}))


def test_cosine_schedule_settles_the_weights_by_the_last_step() -> None:
    """Adam moves each weight by about the learning rate, so how far the weights move per step
    shows the schedule: cosine ends near zero, constant keeps moving as much as at the start."""
    pairs = _toy_pairs()

    def step_sizes(schedule: str) -> list[float]:
        torch.manual_seed(0)
        model = build_unet(PRESETS["tiny"])
        last = [torch.cat([p.detach().flatten() for p in model.parameters()])]
        sizes: list[float] = []

        def on_step(_step: int, _loss: float) -> None:
            now = torch.cat([p.detach().flatten() for p in model.parameters()])
            sizes.append(float((now - last[0]).abs().max()))
            last[0] = now

        train(pairs, CFG.model_copy(update={"lr_schedule": schedule}), model=model, on_step=on_step)
        return sizes

    cosine, constant = step_sizes("cosine"), step_sizes("constant")
    assert len(cosine) == CFG.epochs * (CFG.samples_per_epoch // CFG.batch_size)
    assert cosine[-1] < 0.01 * cosine[0]
    assert constant[-1] > 0.2 * constant[0]
    with pytest.raises(ValueError):
        TrainConfig(lr_schedule="linear")


def test_paper_recipe_is_the_papers() -> None:
    paper = RECIPES["paper"]
    assert (paper.lr, paper.batch_size, paper.epochs, paper.samples_per_epoch) == (
        1e-5,
        1,
        100,
        960,
    )
    assert paper.loss == "weighted" and paper.preset == "paper"


def test_split_other_learns_thick_flakes_as_an_output_of_their_own() -> None:
    """Masks from preload(split_other=True): class 3 is a second kind of `other` (thick
    flakes). The net learns it as its own output, and the Segmenter reports it as `other`."""
    pairs = []
    for img, mask in _toy_pairs():
        mask, img = mask.copy(), img.copy()
        mask[60:75, 45:75] = 3
        img[mask == 3] = (70, 40, 110)  # dark violet: thick MoS2
        pairs.append((img, mask))
    cfg = CFG.model_copy(update={"epochs": 20})
    model, _, weights = train(pairs, cfg, other_outputs=2)
    assert model.config.other_outputs == 2 and model.head.out_channels == 4
    assert weights is not None and len(weights) == 4
    img, mask = pairs[0]
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        own = model.eval()(x).argmax(1)[0].numpy()
    assert (own[mask == 3] == 3).mean() > 0.8
    _, labels = Segmenter(model).predict(img)
    assert (labels[mask == 3] == 0).mean() > 0.8
    with pytest.raises(ValueError, match="other_outputs"):
        train(pairs, cfg, model=build_unet(PRESETS["tiny"]))
