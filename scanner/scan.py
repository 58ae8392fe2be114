"""One chip, end to end: plan, focus map, acquisition, inference, flakes, and what is written.

    acquisition thread --(bounded queue)--> batcher --> inference thread --> recording thread
                                                                         (flakes, zarr, journal)

Every blocking step runs off the event loop in its own thread, and every hand-over is a
bounded queue, so when inference falls behind the acquisition waits instead of filling
memory; while inference keeps up, the stage never waits for it. The loop only routes work
and reports progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import math
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import structlog
from pymmcore_plus import CMMCorePlus

from model.segmenter import Segmenter

from .acquisition import Acquisition, FieldResult, RefocusConfig, StageLimits
from .chip_reference import ChipReference
from .flakemap import (
    SCHEMA_VERSION,
    ChipFrame,
    ScanScore,
    dump_flake_map,
    flake_records,
    replace_atomically,
    score_against_truth,
    write_flake_map,
)
from .flakes import Flake, PixelToStage, TileFlake, extract_flakes, merge_flakes
from .flat_field import (
    FlatFieldError,
    apply_flat_field,
    check_frame_shape,
    estimate_flat_field,
    read_flat_field,
    write_flat_field,
)
from .focus_map import FocusMap
from .focus_survey import FocusSurveyError, survey_focus
from .journal import (
    JOURNAL_NAME,
    JOURNAL_VERSION,
    Journal,
    JournalError,
    plan_digest,
    read_journal,
    tile_flake_to_json,
)
from .pictures import write_flake_crops, write_overview_png
from .plan import (
    FieldOfView,
    check_against_limits,
    check_focus_plan,
    cut_into_tiles,
    flat_field_fields,
    plan_fields,
)
from .scan_config import ScanConfig
from .scan_result import ScanProgress, ScanResult, summary, write_json
from .scan_store import MosaicGrid, ScanStore

log = structlog.get_logger("flakescan.scan")

TILE = 512
FLAT_FIELD_NAME = "flat_field.tif"
#: a band along the chip's edge where nothing counts as a flake (chipped, dirty, dark beyond)
_CHIP_EDGE_UM = 2.0


class ScanError(RuntimeError):
    """The scan cannot start or go on; the message says why and what to change."""


class Scan:
    """Scan the chip on `core` as `cfg` says, writing everything into `out`.

    `out` must be new or empty, unless `resume`: then it must hold a scan of the same plan,
    and only the fields its journal does not show done are scanned. `truth` (simulated rigs)
    is written as truth.json and the result is scored against it.
    """

    def __init__(
        self,
        core: CMMCorePlus,
        cfg: ScanConfig,
        out: Path,
        *,
        segmenter: Segmenter,
        limits: StageLimits,
        resume: bool = False,
        truth: list[dict[str, Any]] | None = None,
        on_progress: Callable[[ScanProgress], None] | None = None,
        rig_info: dict[str, Any] | None = None,
    ) -> None:
        self.core, self.cfg, self.out = core, cfg, Path(out)
        self.segmenter, self.limits, self.resume = segmenter, limits, resume
        self.truth, self.on_progress, self.rig_info = truth, on_progress, rig_info or {}
        self.outline = cfg.chip
        if self.outline is None:
            raise ScanError("the scan config gives no chip outline (scan.chip): where is the chip?")
        self.frame = ChipFrame(
            chip_origin_stage_um=cfg.chip_origin_um or self.outline.bounds[:2],
            rotation_deg=cfg.chip_rotation_deg,
        )
        self._acquisition: Acquisition | None = None
        #: the oxide's colour for tiles a film fills (scan.model.chip_reference), or None
        self.chip_reference: ChipReference | None = None
        if cfg.model.chip_reference and segmenter.config.input_contrast:
            self.chip_reference = ChipReference()
        #: tiles read as on a transparent substrate (scan.model.substrate)
        self.tiles_transparent = 0
        #: the flat-field gain frames are divided by for the model and the overview
        self._gain: np.ndarray | None = None
        self._stop_requested = False
        self._started_at = _now()

    # ------------------------------------------------------------------ setup
    def _calibration(self) -> PixelToStage:
        """Where a frame's pixels lie relative to the stage position (centre at the origin)."""
        core = self.core
        if core.getPixelSizeUm() <= 0:
            raise ScanError(
                "the pixel size of the current objective is not calibrated "
                f"(pixel-size config {core.getCurrentPixelSizeConfig()!r}); define it in the .cfg"
            )
        shape = (int(core.getImageHeight()), int(core.getImageWidth()))
        if min(shape) < TILE:
            raise ScanError(
                f"camera frames are {shape[0]}×{shape[1]} px; the model needs {TILE}×{TILE} tiles "
                "(use a larger camera ROI or no binning)"
            )
        px = float(core.getPixelSizeUm())
        try:
            to_stage = PixelToStage.from_mm_affine(core.getPixelSizeAffine(), (0.0, 0.0), shape)
        except ValueError:
            to_stage = None
        if to_stage is None or abs(to_stage.pixel_size_um / px - 1) > 0.01:
            # A .cfg with only PixelSize_um leaves the affine at identity (1 µm/px): take the
            # pixel size, and assume the camera is aligned with the stage, unmirrored.
            log.warning(
                "scan.pixel_affine_ignored",
                pixel_size_um=px,
                affine=list(core.getPixelSizeAffine()),
                hint="define PixelSizeAffine in the .cfg for a rotated or mirrored camera",
            )
            to_stage = PixelToStage.from_calibration((0.0, 0.0), shape, px)
        return to_stage

    def plan(self) -> tuple[list[FieldOfView], PixelToStage]:
        frame = self._calibration()
        fields = plan_fields(self.outline, fov_um=field_of_view_um(frame), overlap=self.cfg.overlap)
        return fields, frame

    # ------------------------------------------------------------------ run
    def stop(self) -> None:
        """Stop after the field in progress (thread-safe); what is done stays done."""
        self._stop_requested = True
        if self._acquisition is not None:
            self._acquisition.cancel()

    async def run(self) -> ScanResult:
        started = time.perf_counter()
        fields, frame0 = self.plan()
        if not fields:
            raise ScanError("the chip outline holds no field of view")
        digest = plan_digest(fields, frame0.shape, frame0.matrix)
        progress = ScanProgress(fields_total=len(fields))
        lim = self.limits
        try:  # before anything moves or is written
            check_against_limits(fields, lim.x_limits_um, lim.y_limits_um)
        except ValueError as e:
            raise ScanError(str(e)) from None
        store, journal, state = self._open_output(fields, frame0, digest)
        self._started_at = (state.started if state else None) or self._started_at
        try:
            done = state.done() if state else set()
            if state and state.chip_colour and self.chip_reference is not None:
                self.chip_reference.start_from(state.chip_colour)
            tile_flakes: list[TileFlake] = state.tile_flakes() if state else []
            failed: dict[int, dict[str, Any]] = {}
            progress.fields_done = progress.fields_resumed = len(done)
            self._count(progress, tile_flakes)
            self._report(progress)

            progress.phase = "focusing"
            self._report(progress)
            z_um, points = await asyncio.to_thread(
                self._focus, journal, state.focus_points if state else None, frame0, fields
            )
            todo = [f for f in fields if f.index not in done]
            gain: Awaitable[np.ndarray | None] = _done(None)
            if todo and not self._stop_requested:
                gain = await self._flat_field(fields, z_um, frame0, journal)
            progress.phase = "scanning"
            self._report(progress)
            try:
                if todo and not self._stop_requested:
                    await self._scan_fields(
                        todo, z_um, gain, frame0, store, journal, tile_flakes, failed, progress
                    )
            finally:
                if isinstance(gain, asyncio.Future):
                    await asyncio.wait([gain])  # its thread finishes before the journal closes
                    if not gain.cancelled():
                        gain.exception()  # raised through inference, or moot: a stop came first

            def result(records: list[dict[str, Any]], score: ScanScore | None) -> ScanResult:
                elapsed = time.perf_counter() - started
                return ScanResult(
                    self.out, progress, records, list(failed.values()), score, elapsed, points
                )

            remaining = progress.fields_total - progress.fields_done - progress.fields_failed
            if self._stop_requested and remaining > 0:
                # What is done is in the journal and the store; the map shows it, and
                # `--resume` finishes the rest. No overview or crops for a partial chip.
                records = await asyncio.to_thread(
                    self._merge_and_write, tile_flakes, frame0.pixel_size_um
                )
                progress.phase = "stopped"
                self._report(progress)
                return result(records, None)
            progress.phase = "finishing"
            self._report(progress)
            records = await asyncio.to_thread(
                self._finish, store, tile_flakes, frame0.pixel_size_um
            )
            journal.write("finished", at=_now())
            score = None
            if self.truth is not None:
                score = score_against_truth(records, self.truth)
                write_json(self.out / "score.json", score.model_dump(mode="json"))
            progress.phase = "done"
            self._report(progress)
            finished = result(records, score)
            write_json(self.out / "summary.json", summary(finished))
            return finished
        finally:
            journal.close()

    def _open_output(
        self,
        fields: Sequence[FieldOfView],
        frame0: PixelToStage,
        digest: str,
    ) -> tuple[ScanStore, Journal, Any]:
        out = self.out
        if self.resume:
            state = read_journal(out / JOURNAL_NAME)
            if state.plan_digest != digest:
                raise JournalError(
                    f"{out} holds a scan of a different plan (chip, overlap, objective or camera "
                    "changed); resume it with the config it was started with, or start a new scan"
                )
            if (out / "scan.zarr" / "zarr.json").is_file():
                store = ScanStore.open(out / "scan.zarr")
            else:  # killed before the store was made: nothing was scanned yet
                shutil.rmtree(out / "scan.zarr", ignore_errors=True)
                store = self._create_store(fields, frame0, digest)
            journal = Journal(out / JOURNAL_NAME)
            journal.write("resumed", at=_now())
            return store, journal, state
        if out.exists() and any(out.iterdir()):
            raise ScanError(
                f"{out} already holds files; choose a new folder, or resume the scan there "
                f"with --resume {out}"
            )
        out.mkdir(parents=True, exist_ok=True)
        # The journal's start line first: a folder killed while the store is being created
        # then resumes (the store is made again) instead of being neither new nor resumable.
        journal = Journal(out / JOURNAL_NAME)
        journal.write(
            "start",
            version=JOURNAL_VERSION,
            plan_digest=digest,
            fields=len(fields),
            started=self._started_at,
            config=self.cfg.model_dump(mode="json"),
        )
        store = self._create_store(fields, frame0, digest)
        return store, journal, None

    def _create_store(
        self,
        fields: Sequence[FieldOfView],
        frame0: PixelToStage,
        digest: str,
    ) -> ScanStore:
        w, h = frame0.footprint().bounds[2:]  # the frame's half extents
        xs = [f.x_um for f in fields]
        ys = [f.y_um for f in fields]
        bounds = (min(xs) - w, min(ys) - h, max(xs) + w, max(ys) + h)
        return ScanStore.create(
            self.out / "scan.zarr",
            n_fields=len(fields),
            tiles_per_field=len(cut_into_tiles(np.zeros(frame0.shape, np.uint8), TILE)),
            tile_shape=(TILE, TILE),
            mosaic=MosaicGrid.covering(bounds, self.cfg.overview_um_per_px),
            attrs={
                "flakescan": {"what": "scan", "plan_digest": digest},
                "pixel_matrix": list(frame0.matrix),
                "pixel_size_um": frame0.pixel_size_um,
                "fields": [[f.name, f.x_um, f.y_um] for f in fields],
                "classes": ["other", "monolayer", "bilayer"],
            },
        )

    # ------------------------------------------------------------------ focus
    def _focus(
        self,
        journal: Journal,
        known: list[tuple[float, float, float]] | None,
        frame0: PixelToStage,
        fields: Sequence[FieldOfView],
    ) -> tuple[Callable[[float, float], float] | None, list[tuple[float, float, float]]]:
        fc = self.cfg.focus
        if fc.strategy == "none":
            return None, []
        if known is not None:  # resumed: the chip has not moved, the surface stands
            return FocusMap().fit(known).z_at, known
        try:
            surface, found = survey_focus(
                self.core,
                self.outline,
                fc,
                self.limits,
                field_step_um=field_of_view_um(frame0),
                should_stop=lambda: self._stop_requested,
            )
        except FocusSurveyError as e:
            if self._stop_requested:
                return None, []  # stopped: nothing journalled, the resume surveys again
            raise ScanError(str(e)) from None
        try:  # refused before the surface is journalled: a resume would reuse it
            check_focus_plan(fields, surface.z_at, self.limits.safe_z_um, self.limits.lower_z_um)
        except ValueError as e:
            raise ScanError(
                f"the focus surface through {found} leaves the safe range: {e}"
            ) from None
        journal.write(
            "focus",
            points=[list(p) for p in found],
            surface=surface.kind,
            residuals_um=np.round(surface.residuals_um, 3).tolist(),
        )
        return surface.z_at, found

    # ------------------------------------------------------------------ flat field
    async def _flat_field(
        self,
        fields: Sequence[FieldOfView],
        z_um: Callable[[float, float], float] | None,
        frame0: PixelToStage,
        journal: Journal,
    ) -> Awaitable[np.ndarray | None]:
        """The gain every frame is divided by before the model (scan.flat_field), or None.

        An estimate is returned still computing: the scan's first fields are acquired
        meanwhile, and inference waits for it, so the stage never waits for the estimate.
        """
        fc = self.cfg.flat_field
        path = self.out / FLAT_FIELD_NAME
        try:
            if fc.source == "none":
                return _done(None)
            if self.resume and path.is_file():  # every tile of one chip corrected alike
                return _done(read_flat_field(path))
            if isinstance(fc.source, Path):
                gain = read_flat_field(fc.source)
                check_frame_shape(gain, frame0.shape)
                return _done(self._keep_flat_field(gain, str(fc.source), journal))
            fov_um = field_of_view_um(frame0)
            frames = await self._flat_field_frames(fields, z_um, fov_um, fc.frames)
        except FlatFieldError as e:
            raise ScanError(f"flat field (scan.flat_field): {e}") from None
        if self._stop_requested:  # stopped before the chip: the resume estimates it
            return _done(None)

        def estimate() -> np.ndarray:
            try:
                gain = estimate_flat_field(frames, fc.degree)
            except FlatFieldError as e:
                raise ScanError(f"flat field (scan.flat_field): {e}") from None
            if self.chip_reference is not None:
                # Inference waits for this gain, so the segmenter is free here.
                _, tiles = _model_tiles(frames, gain)
                seeds = self.chip_reference.seed(self.segmenter.references(tiles))
                log.info("scan.chip_reference", seeded_from_tiles=seeds, of=len(tiles))
                if (colour := self.chip_reference.colour) is not None:  # for a resume
                    journal.write("chip_reference", colour=[round(float(c), 6) for c in colour])
            return self._keep_flat_field(gain, f"{len(frames)} frames", journal)

        return asyncio.ensure_future(asyncio.to_thread(estimate))

    def _keep_flat_field(self, gain: np.ndarray, source: str, journal: Journal) -> np.ndarray:
        # Journalled before any field is recorded: inference, and so recording, waits for it.
        write_flat_field(self.out / FLAT_FIELD_NAME, gain)
        spread = {"gain_min": round(float(gain.min()), 4), "gain_max": round(float(gain.max()), 4)}
        journal.write("flat_field", source=source, **spread)
        log.info("scan.flat_field", source=source, **spread)
        return gain

    async def _flat_field_frames(
        self,
        fields: Sequence[FieldOfView],
        z_um: Callable[[float, float], float] | None,
        fov_um: tuple[float, float],
        n: int,
    ) -> list[np.ndarray]:
        """Frames at `n` fields spread over the chip, through the scan's own safe engine."""
        acq = Acquisition(
            self.core,
            flat_field_fields(fields, self.outline.shape(), fov_um, n),
            z_um=z_um,
            config=self.cfg.acquisition,
            queue_size=n,
            limits=self.limits,
        )
        self._acquisition = acq
        if self._stop_requested:
            acq.cancel()
        try:
            frames = [r.frame async for r in acq.results() if r.ok and r.frame is not None]
        finally:
            self._acquisition = None
        if not frames and not self._stop_requested:
            raise FlatFieldError(
                f"every one of {len(acq.fields)} flat-field frames failed (see the log)"
            )
        return frames

    # ------------------------------------------------------------------ the pipeline
    async def _scan_fields(
        self,
        todo: list[FieldOfView],
        z_um: Callable[[float, float], float] | None,
        gain: Awaitable[np.ndarray | None],
        frame0: PixelToStage,
        store: ScanStore,
        journal: Journal,
        tile_flakes: list[TileFlake],
        failed: dict[int, dict[str, Any]],
        progress: ScanProgress,
    ) -> None:
        cfg = self.cfg
        refocus = None
        if cfg.focus.refocus_max_edge_blur_px is not None and self.core.getFocusDevice():
            refocus = RefocusConfig(
                max_edge_blur_px=cfg.focus.refocus_max_edge_blur_px,
                safe_z_um=self.limits.safe_z_um,
                lower_z_um=self.limits.lower_z_um,
            )
        acq = Acquisition(
            self.core,
            todo,
            z_um=z_um,
            config=cfg.acquisition,
            queue_size=cfg.queue_size,
            limits=self.limits,
            refocus=refocus,
        )
        self._acquisition = acq
        if self._stop_requested:
            acq.cancel()
        batch_size = cfg.model.batch_size
        # Small hand-over queues: the acquisition's own queue is the buffer that matters.
        fields_q: asyncio.Queue[FieldResult | None] = asyncio.Queue(maxsize=batch_size)
        post_q: asyncio.Queue[tuple | None] = asyncio.Queue(maxsize=1)
        infer_pool = ThreadPoolExecutor(1, thread_name_prefix="flakescan-inference")
        post_pool = ThreadPoolExecutor(1, thread_name_prefix="flakescan-recording")
        loop = asyncio.get_running_loop()
        map_pool = ThreadPoolExecutor(1, thread_name_prefix="flakescan-flake-map")
        last_map = [time.monotonic()]
        map_job: list[asyncio.Future | None] = [None]

        async def pump() -> None:
            # aclosing: if a consumer fails while this waits on a full queue, the generator's
            # cleanup (stop the thread, restore the engine) still runs now, not at GC.
            async with contextlib.aclosing(acq.results()) as results:
                async for result in results:
                    await fields_q.put(result)
            await fields_q.put(None)

        async def infer() -> None:
            self._gain = await gain
            ending = False
            while not ending:
                first = await fields_q.get()
                if first is None:
                    break
                batch = [first]
                while sum(r.ok for r in batch) * store.tiles_per_field < batch_size:
                    try:
                        more = fields_q.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                    if more is None:
                        ending = True
                        break
                    batch.append(more)
                frames = [r.frame for r in batch if r.ok]
                probs = labels = None
                if frames:
                    frames, probs, labels = await loop.run_in_executor(
                        infer_pool, self._segment, frames
                    )
                await post_q.put((batch, frames, probs, labels))
            await post_q.put(None)

        async def record() -> None:
            while (item := await post_q.get()) is not None:
                batch, seen, probs, labels = item
                found = await loop.run_in_executor(
                    post_pool,
                    self._record_batch,
                    batch,
                    seen,
                    probs,
                    labels,
                    frame0,
                    store,
                    journal,
                )
                for result, pieces in zip(batch, found, strict=True):
                    if result.ok:
                        tile_flakes.extend(pieces)
                        progress.fields_done += 1
                    else:
                        failed[result.index] = _failed_record(result)
                        progress.fields_failed += 1
                self._count(progress, tile_flakes)
                self._report(progress)
                due = time.monotonic() - last_map[0] >= cfg.flake_map_every_s
                if due and (map_job[0] is None or map_job[0].done()):
                    # On its own worker, and skipped while the last one runs: merging a big
                    # chip's pieces takes a second and must not hold up the recording.
                    last_map[0] = time.monotonic()
                    map_job[0] = loop.run_in_executor(
                        map_pool, self._merge_and_write, list(tile_flakes), frame0.pixel_size_um
                    )
            if map_job[0] is not None:
                await map_job[0]

        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(pump())
                tg.create_task(infer())
                tg.create_task(record())
        except* Exception as group:
            # One failure cancels the other stages; raise it as itself, not as a group.
            first = group.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        finally:
            acq.cancel()
            for pool in (infer_pool, post_pool, map_pool):
                await asyncio.to_thread(pool.shutdown, wait=True)
            self._acquisition = None

    def _segment(self, frames: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """The frames flat-field corrected, and the model's probabilities and labels for
        every tile of them."""
        frames, tiles = _model_tiles(frames, self._gain)
        seg = self.segmenter
        if self.chip_reference is None and seg.substrate == "oxide":
            return frames, *seg.predict(tiles)
        # A tile's own references are what predict would find itself (tiles are one window).
        references, transparent = seg.substrate_references(tiles)
        if self.chip_reference is not None:
            references, replaced = self.chip_reference.choose(references)
            if replaced.any():
                log.info("inference.chip_reference", tiles=int(replaced.sum()), of=len(tiles))
                # The chip's colour is its substrate's: mirrored only on a transparent chip.
                transparent[replaced] = seg.substrate == "transparent"
        if transparent.any():
            self.tiles_transparent += int(transparent.sum())
            log.info("inference.transparent_substrate", tiles=int(transparent.sum()), of=len(tiles))
        return frames, *seg.predict(tiles, references=references, transparent=transparent)

    def _record_batch(
        self,
        batch: list[FieldResult],
        seen: list[np.ndarray],
        probs: np.ndarray | None,
        labels: np.ndarray | None,
        frame0: PixelToStage,
        store: ScanStore,
        journal: Journal,
    ) -> list[list[TileFlake]]:
        """Flakes, zarr and journal for a segmented batch (the recording thread). `seen`:
        the good fields' frames as the model saw them (flat-field corrected)."""
        found: list[list[TileFlake]] = []
        k = 0
        seen_by_field = iter(seen)
        for n, result in enumerate(batch):
            if result.ok:
                corrected = next(seen_by_field)
                try:
                    found.append(
                        self._record_field(
                            result, corrected, probs, labels, k, frame0, store, journal
                        )
                    )
                    k += store.tiles_per_field
                    continue
                except Exception as e:  # one field's trouble must not end the chip
                    log.error("field.recording_failed", field=result.name, error=repr(e))
                    k += store.tiles_per_field
                    result = dataclasses.replace(
                        result, ok=False, frame=None, error=f"recording failed: {e!r}"
                    )
                    batch[n] = result
            store.mark_failed(result.index)
            journal.write("field", **_failed_record(result))
            found.append([])
        return found

    def _record_field(
        self,
        result: FieldResult,
        corrected: np.ndarray,
        probs: np.ndarray | None,
        labels: np.ndarray | None,
        k: int,
        frame0: PixelToStage,
        store: ScanStore,
        journal: Journal,
    ) -> list[TileFlake]:
        assert probs is not None and labels is not None and result.frame is not None
        # The stage's own reading places the frame (it arrived within tolerance of the
        # plan; the difference is real and a robot wants the real place).
        centre = result.stage_xy_um or (result.x_um, result.y_um)
        frame_map = PixelToStage(
            center_um=centre, shape=result.frame.shape[:2], matrix=frame0.matrix
        )
        written, pieces, views = [], [], {}
        for j, (r0, c0, tile) in enumerate(cut_into_tiles(result.frame, TILE)):
            t = store.tile_index(result.index, j)
            to_stage = _tile_map(frame_map, r0, c0)
            pieces += self._on_chip(
                extract_flakes(
                    labels[k],
                    probs[k],
                    to_stage,
                    tile=t,
                    min_area_um2=self.cfg.min_flake_area_um2,
                )
            )
            views[str(t)] = shapely.to_wkb(to_stage.footprint(), hex=True)
            written.append((tile, labels[k], to_stage))
            k += 1
        overview = None
        if corrected is not result.frame:
            overview = [tile for _, _, tile in cut_into_tiles(corrected, TILE)]
        store.write_field(result.index, written, overview)
        journal.write(
            "field",
            index=result.index,
            name=result.name,
            ok=True,
            x_um=result.x_um,
            y_um=result.y_um,
            stage_xy_um=list(centre),
            z_um=result.z_um,
            attempts=result.attempts,
            refocused_from_um=result.refocused_from_um,
            views=views,
            flakes=[tile_flake_to_json(p) for p in pieces],
        )
        return pieces

    def _on_chip(self, pieces: list[TileFlake]) -> list[TileFlake]:
        """Pieces mostly on the chip: the chip's broken edge against the dark stage insert
        looks like a thin film to the model, and a robot cannot pick beyond the chip anyway."""
        inner = self._chip_inner
        return [
            p for p in pieces if shapely.intersection(p.polygon, inner).area >= 0.5 * p.area_um2
        ]

    @property
    def _chip_inner(self) -> shapely.Geometry:
        if not hasattr(self, "_inner"):
            self._inner = self.outline.shape().buffer(-_CHIP_EDGE_UM)
            shapely.prepare(self._inner)
        return self._inner

    # ------------------------------------------------------------------ finishing
    def _scan_meta(self, pixel_size_um: float) -> dict[str, Any]:
        ring = list(self.outline.shape().exterior.coords)
        return {
            "started": self._started_at,
            "chip_outline_stage_um": [[round(x, 3), round(y, 3)] for x, y in ring],
            "pixel_size_um": pixel_size_um,
            "objective": self.rig_info.get("objective", ""),
            "model": self.rig_info.get("model", ""),
            "rig": self.rig_info.get("rig", ""),
        }

    def _merge_and_write(self, tile_flakes: list[TileFlake], pixel_size_um: float) -> list[dict]:
        """flakes.json of what is done so far (during the scan, or when it stops)."""
        return self._write_map(self._merged(tile_flakes), pixel_size_um, None)

    def _merged(self, tile_flakes: list[TileFlake]) -> list[Flake]:
        """Whole flakes from the tiles' pieces, those the model is sure enough of."""
        least = self.cfg.min_flake_confidence
        return [f for f in merge_flakes(tile_flakes) if f.confidence >= least]

    def _write_map(
        self,
        flakes: Sequence[Flake],
        pixel_size_um: float,
        patches: dict[int, str] | None,
    ) -> list[dict[str, Any]]:
        doc = write_flake_map(
            self.out / "flakes.json",
            flakes,
            scan_meta=self._scan_meta(pixel_size_um),
            chip_origin_stage_um=self.frame.chip_origin_stage_um,
            rotation_deg=self.frame.rotation_deg,
            patches=patches,
        )
        return doc["flakes"]

    def _finish(
        self, store: ScanStore, tile_flakes: list[TileFlake], pixel_size_um: float
    ) -> list[dict[str, Any]]:
        store.finish_overview()
        flakes = self._merged(tile_flakes)
        # the crops are named by flake id, which the map's record order assigns
        ids = flake_records(flakes, self.frame)
        patches = write_flake_crops(store, ids, self.out / "flakes", self.out)
        records = self._write_map(flakes, pixel_size_um, patches)
        write_overview_png(store, records, self.out / "overview.png")
        if self.truth is not None:
            truth = {
                "schema_version": SCHEMA_VERSION,
                "scan": {**self._scan_meta(pixel_size_um), "truth": "simulated world"},
                "frames": self.frame.model_dump(mode="json"),
                "flakes": self.truth,
            }
            replace_atomically(self.out / "truth.json", dump_flake_map(truth))
        return records

    # ------------------------------------------------------------------ progress
    def _count(self, progress: ScanProgress, tile_flakes: list[TileFlake]) -> None:
        # Pieces, not merged flakes: merging on every field would cost more than the scan.
        # The count is per tile piece, so a flake across two tiles counts twice until the end.
        sure = [f for f in tile_flakes if f.confidence >= self.cfg.min_flake_confidence]
        progress.monolayers = sum(f.layer_class == "monolayer" for f in sure)
        progress.bilayers = sum(f.layer_class == "bilayer" for f in sure)
        if self.chip_reference is not None:
            progress.tiles_chip_reference = self.chip_reference.replaced
        progress.tiles_transparent = self.tiles_transparent

    def _report(self, progress: ScanProgress) -> None:
        if self.on_progress is not None:
            self.on_progress(progress)


# ---------------------------------------------------------------------- helpers
def _done(value: np.ndarray | None) -> asyncio.Future[np.ndarray | None]:
    future: asyncio.Future[np.ndarray | None] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


def _tile_map(frame_map: PixelToStage, r0: int, c0: int) -> PixelToStage:
    centre = frame_map.pixel_to_stage(np.array(r0 + (TILE - 1) / 2), np.array(c0 + (TILE - 1) / 2))
    return PixelToStage(
        center_um=(float(centre[0]), float(centre[1])),
        shape=(TILE, TILE),
        matrix=frame_map.matrix,
    )


def _model_tiles(
    frames: list[np.ndarray], gain: np.ndarray | None
) -> tuple[list[np.ndarray], np.ndarray]:
    """The frames flat-field corrected (by ``gain``, where there is one), and every tile of
    them stacked, as the model sees them."""
    if gain is not None:
        frames = [apply_flat_field(f, gain) for f in frames]
    return frames, np.stack([t for f in frames for _, _, t in cut_into_tiles(f, TILE)])


def _failed_record(result: FieldResult) -> dict[str, Any]:
    return {
        "index": result.index,
        "name": result.name,
        "ok": False,
        "x_um": result.x_um,
        "y_um": result.y_um,
        "stage_xy_um": list(result.stage_xy_um) if result.stage_xy_um else None,
        "z_um": result.z_um,
        "attempts": result.attempts,
        "error": result.error,
    }


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def field_of_view_um(frame: PixelToStage) -> tuple[float, float]:
    """The axis-aligned rectangle (stage µm) the camera sees whole, for the grid plan.

    Square to the stage (any multiple of 90°, mirrored or not) that is the frame itself; a
    camera turned by θ in between sees a tilted frame, and only the rectangle inscribed in
    it is covered: planning with the frame's bounding box would leave strips unseen.
    """
    a, _, c, _ = frame.matrix
    h_px, w_px = frame.shape
    w, h = w_px * frame.pixel_size_um, h_px * frame.pixel_size_um
    theta = math.degrees(math.atan2(c, a))
    quarter = round(theta / 90)
    if quarter % 2:
        w, h = h, w
    rest = math.radians(theta - 90 * quarter)
    cos, sin = abs(math.cos(rest)), abs(math.sin(rest))
    k = min(w / (w * cos + h * sin), h / (w * sin + h * cos))
    return w * k, h * k
