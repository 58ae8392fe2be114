"""drivers.micromanager: loading a lab's Micro-Manager .cfg, checking it, refusing bad rigs.

No Micro-Manager device adapters are installed where these tests run, so each rig is a .cfg of
Python devices (`#py pyDevice` lines, see tests/mm_stub_devices.py) loaded into a FlakescanCore.
Every core a test makes is disposed of by the `mm_core` fixture: a core still alive at interpreter
exit can abort the process.
"""

from __future__ import annotations

import pickle
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from pymmcore_plus import CFGCommand

from drivers.configfile import ConfigError
from drivers.micromanager import (
    MicroManagerRigConfig,
    RigCheckError,
    RigCheckWarning,
    check_rig,
    load_rig_config,
    open_micromanager_rig,
)
from drivers.unicore import FlakescanCore, dispose_core

try:  # the .cfg names the stub module as importable here: `tests.` from the root, else bare
    from tests import mm_stub_devices as stubs
except ImportError:
    import mm_stub_devices as stubs  # type: ignore[no-redef]

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STUBS = stubs.__name__

# One rig, in parts a test can leave out: (lines before Initialize, lines after it).
PARTS: dict[str, tuple[list[str], list[str]]] = {
    "xy": ([f"#py pyDevice,XY,{STUBS},StubXYStage"], ["#py Property,Core,XYStage,XY"]),
    "focus": ([f"#py pyDevice,Z,{STUBS},StubFocus"], ["#py Property,Core,Focus,Z"]),
    "camera": ([f"#py pyDevice,Cam,{STUBS},StubRGBCamera"], ["#py Property,Core,Camera,Cam"]),
    "shutter": ([f"#py pyDevice,Lamp,{STUBS},StubShutter"], ["#py Property,Core,Shutter,Lamp"]),
    "turret": ([f"#py pyDevice,Turret,{STUBS},StubTurret"], []),
    "labels": ([], ["#py Label,Turret,0,5x", "#py Label,Turret,1,20x", "#py Label,Turret,4,100x"]),
    "pixel_5x": ([], ["#py ConfigPixelSize,Res5x,Turret,Label,5x", "PixelSize_um,Res5x,1.38"]),
    "pixel_100x": (
        [],
        ["#py ConfigPixelSize,Res100x,Turret,Label,100x", "PixelSize_um,Res100x,0.069"],
    ),
}


def write_cfg(
    path: Path,
    *,
    without: tuple[str, ...] = (),
    swap: dict[str, str] | None = None,
    devices: tuple[str, ...] = (),
    extra: tuple[str, ...] = (),
    roles: bool = True,
) -> Path:
    """A rig .cfg: all PARTS but `without`, classes renamed by `swap`, more `devices` loaded,
    `extra` lines at the end, and without Property,Core role lines unless `roles`."""
    parts = [PARTS[name] for name in PARTS if name not in without]
    lines = ["Property,Core,Initialize,0"]
    lines += [line for pre, _ in parts for line in pre] + list(devices)
    lines += ["Property,Core,Initialize,1"]
    lines += [line for _, post in parts for line in post if roles or "Property,Core," not in line]
    text = "\n".join([*lines, *extra]) + "\n"
    for old, new in (swap or {}).items():
        text = text.replace(f",{old}\n", f",{new}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def mm_rig_config(cfg_file: Path, **fields: object) -> MicroManagerRigConfig:
    values: dict[str, object] = {
        "rig": "micromanager",
        "mm_config": cfg_file,
        "safe_z_um": 500.0,
        "x_limits_um": (0.0, 10_000.0),
        "y_limits_um": (0.0, 10_000.0),
    }
    return MicroManagerRigConfig.model_validate(values | fields)


@pytest.fixture
def mm_core(tmp_path: Path) -> Iterator[FlakescanCore]:
    # An empty mm_path: no Micro-Manager install to find here, and none is needed.
    mm_dir = tmp_path / "no-mm-install"
    mm_dir.mkdir()
    c = FlakescanCore(mm_path=str(mm_dir))
    yield c
    dispose_core(c)


def open_problems(cfg: MicroManagerRigConfig, core: FlakescanCore) -> RigCheckError:
    with pytest.raises(RigCheckError) as info:
        open_micromanager_rig(cfg, core)
    return info.value


# --------------------------------------------------------------------------- a good rig


def test_complete_rig_opens_with_the_objective_and_its_pixel_size(tmp_path, mm_core):
    cfg = mm_rig_config(write_cfg(tmp_path / "rig.cfg"), timeout_ms=12_345)
    assert open_micromanager_rig(cfg, mm_core) is mm_core
    assert mm_core.getStateLabel("Turret") == "100x"
    assert mm_core.getCurrentPixelSizeConfig() == "Res100x"
    assert mm_core.getPixelSizeUm() == pytest.approx(0.069)
    assert mm_core.getTimeoutMs() == 12_345
    assert (mm_core.getXYStageDevice(), mm_core.getFocusDevice(), mm_core.getCameraDevice()) == (
        "XY",
        "Z",
        "Cam",
    )


def test_another_objective_can_be_chosen(tmp_path, mm_core):
    cfg = mm_rig_config(write_cfg(tmp_path / "rig.cfg"), objective="5x")
    open_micromanager_rig(cfg, mm_core)
    assert mm_core.getStateLabel("Turret") == "5x"
    assert mm_core.getPixelSizeUm() == pytest.approx(1.38)


def test_labels_in_the_yaml_make_those_devices_current(tmp_path, mm_core):
    # No Property,Core lines in the .cfg, and a second camera that the YAML picks.
    cfg_file = write_cfg(
        tmp_path / "rig.cfg", roles=False, devices=(f"#py pyDevice,Cam2,{STUBS},StubRGBCamera",)
    )
    cfg = mm_rig_config(
        cfg_file, xy_stage="XY", focus_drive="Z", camera="Cam2", objective_turret="Turret"
    )
    open_micromanager_rig(cfg, mm_core)
    assert (mm_core.getXYStageDevice(), mm_core.getFocusDevice(), mm_core.getCameraDevice()) == (
        "XY",
        "Z",
        "Cam2",
    )


def test_a_pixel_size_config_may_select_the_objective_by_position(tmp_path, mm_core):
    cfg_file = write_cfg(
        tmp_path / "rig.cfg",
        without=("pixel_100x",),
        extra=("#py ConfigPixelSize,ResTop,Turret,State,4", "PixelSize_um,ResTop,0.07"),
    )
    open_micromanager_rig(mm_rig_config(cfg_file), mm_core)
    assert mm_core.getCurrentPixelSizeConfig() == "ResTop"
    assert mm_core.getPixelSizeUm() == pytest.approx(0.07)


def test_a_monochrome_camera_warns_but_passes(tmp_path, mm_core):
    cfg_file = write_cfg(tmp_path / "rig.cfg", swap={"StubRGBCamera": "StubMonoCamera"})
    with pytest.warns(RigCheckWarning, match=r"camera 'Cam' is monochrome"):
        open_micromanager_rig(mm_rig_config(cfg_file), mm_core)


def test_check_rig_alone_accepts_a_loaded_complete_rig(tmp_path, mm_core):
    cfg_file = write_cfg(tmp_path / "rig.cfg")
    mm_core.loadSystemConfiguration(str(cfg_file))
    check_rig(mm_core, mm_rig_config(cfg_file))  # the objective need not be selected yet


# ------------------------------------------------------------------- each missing piece


@pytest.mark.parametrize(
    ("without", "swap", "expected"),
    [
        (("xy",), {}, [r"no XY stage", r"Property,Core,XYStage", r"\(xy_stage\)"]),
        (("focus",), {}, [r"no focus drive", r"Property,Core,Focus"]),
        (("camera",), {}, [r"no camera", r"Property,Core,Camera"]),
        (("labels",), {}, [r"no StateDevice has a position labelled '100x'", r"Turret"]),
        (("pixel_100x",), {}, [r"no pixel-size config selects objective '100x'", r"Res5x"]),
        (
            (),
            {"StubXYStage": "BrokenXYStage"},
            [r"device 'XY' did not initialize \(.*BrokenXYStage: InitializationFailed\)"],
        ),
    ],
    ids=["no-xy", "no-focus", "no-camera", "no-objective-label", "no-pixel-size", "init-failed"],
)
def test_each_missing_piece_is_named(tmp_path, mm_core, without, swap, expected):
    cfg = mm_rig_config(write_cfg(tmp_path / "rig.cfg", without=without, swap=swap))
    err = open_problems(cfg, mm_core)
    assert len(err.problems) == 1, err.problems
    for pattern in expected:
        assert re.search(pattern, str(err)), (pattern, str(err))


def test_objective_label_missing_from_a_named_turret(tmp_path, mm_core):
    cfg = mm_rig_config(write_cfg(tmp_path / "rig.cfg"), objective="63x", objective_turret="Turret")
    err = open_problems(cfg, mm_core)
    assert "objective turret 'Turret' has no position labelled '63x'" in str(err)
    assert "Label,Turret,<position>,63x" in str(err)


def test_a_zero_pixel_size_is_refused(tmp_path, mm_core):
    cfg_file = write_cfg(tmp_path / "rig.cfg", without=("pixel_100x",))
    cfg_file.write_text(
        cfg_file.read_text()
        + "#py ConfigPixelSize,Res100x,Turret,Label,100x\nPixelSize_um,Res100x,0\n"
    )
    err = open_problems(mm_rig_config(cfg_file), mm_core)
    assert "pixel-size config 'Res100x' for objective '100x' has no pixel size" in str(err)


def test_a_label_naming_the_wrong_kind_of_device(tmp_path, mm_core):
    cfg = mm_rig_config(write_cfg(tmp_path / "rig.cfg"), xy_stage="Z", camera="NoSuchCam")
    err = open_problems(cfg, mm_core)
    assert "XY stage 'Z' has the wrong type: StageDevice, expected XYStageDevice" in str(err)
    assert "camera: camera 'NoSuchCam' is not a device in the .cfg" in str(err)
    assert len(err.problems) == 2


def test_several_missing_pieces_are_all_listed(tmp_path, mm_core):
    cfg_file = write_cfg(
        tmp_path / "rig.cfg",
        without=("xy", "camera", "pixel_100x"),
        devices=(f"#py pyDevice,Stuck,{STUBS},BrokenXYStage",),
    )
    err = open_problems(mm_rig_config(cfg_file), mm_core)
    message = str(err)
    assert len(err.problems) == 4, err.problems
    for piece in (
        "device 'Stuck' did not initialize",
        "no XY stage",
        "no camera",
        "no pixel-size config selects objective '100x'",
    ):
        assert piece in message
    # one problem per line, under a header naming the .cfg
    assert message.splitlines()[0] == f"{cfg_file}: the rig cannot scan:"
    assert len(message.splitlines()) == 1 + len(err.problems)


def test_rig_check_error_pickles_with_its_problems():
    err = pickle.loads(pickle.dumps(RigCheckError(["no camera", "no XY stage"], header="x.cfg")))
    assert err.problems == ["no camera", "no XY stage"]
    assert str(err) == "x.cfg:\n  - no camera\n  - no XY stage"


def test_a_failed_open_unloads_the_devices(tmp_path, mm_core):
    open_problems(mm_rig_config(write_cfg(tmp_path / "rig.cfg", without=("focus",))), mm_core)
    assert set(mm_core.getLoadedDevices()) <= {"Core"}


def test_a_cfg_that_does_not_load_names_the_file(tmp_path, mm_core):
    cfg_file = write_cfg(tmp_path / "rig.cfg", swap={"StubFocus": "NoSuchDeviceClass"})
    with pytest.raises(RuntimeError, match=re.escape(str(cfg_file))) as info:
        open_micromanager_rig(mm_rig_config(cfg_file), mm_core)
    assert not isinstance(info.value, RigCheckError)
    assert set(mm_core.getLoadedDevices()) <= {"Core"}


def test_a_missing_cfg_file_is_named(tmp_path, mm_core):
    missing = tmp_path / "nowhere" / "rig.cfg"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        open_micromanager_rig(mm_rig_config(missing), mm_core)


# ------------------------------------------------------------------------- the rig YAML


def write_yaml(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(body))
    return path


GOOD_YAML = """\
    rig: micromanager
    mm_config: ../mm/rig.cfg
    safe_z_um: 250.0
    x_limits_um: [-100, 25000]
    y_limits_um: [0, 25000]
"""


def test_relative_mm_config_is_resolved_against_the_yaml_folder(tmp_path, monkeypatch):
    cfg_file = write_cfg(tmp_path / "mm" / "rig.cfg")
    yaml_file = write_yaml(tmp_path / "rigs" / "bx51.yaml", GOOD_YAML)
    monkeypatch.chdir(tmp_path / "mm")  # somewhere the relative path would mean something else
    cfg = load_rig_config(yaml_file)
    assert cfg.mm_config.is_absolute()
    assert cfg.mm_config.resolve() == cfg_file.resolve()
    assert cfg.x_limits_um == (-100.0, 25000.0)
    assert (cfg.objective, cfg.timeout_ms, cfg.xy_stage) == ("100x", 20_000, None)


def test_a_yaml_pointing_to_a_missing_cfg_names_both(tmp_path):
    yaml_file = write_yaml(tmp_path / "rigs" / "bx51.yaml", GOOD_YAML)
    with pytest.raises(ConfigError) as info:
        load_rig_config(yaml_file)
    assert str(yaml_file) in str(info.value)
    assert str((tmp_path / "mm" / "rig.cfg").resolve()) in str(info.value)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda y: y + "    xy_stag: XY\n", "xy_stag"),
        (lambda y: y.replace("    safe_z_um: 250.0\n", ""), "safe_z_um"),
        (lambda y: y.replace("[-100, 25000]", "[25000, -100]"), "x_limits_um"),
        (lambda y: y.replace("[0, 25000]", "[0]"), "y_limits_um"),
        (lambda y: y.replace("rig: micromanager", "rig: simulated"), "rig"),
        (lambda y: y + "    timeout_ms: 0\n", "timeout_ms"),
        (lambda y: y + "    camera: ''\n", "camera"),
        (lambda y: y.replace("250.0", ".nan"), "safe_z_um"),
    ],
    ids=[
        "unknown-field",
        "no-safe-z",
        "limits-reversed",
        "short-limits",
        "wrong-rig",
        "timeout",
        "empty-label",
        "nan-safe-z",
    ],
)
def test_a_bad_yaml_field_is_named(tmp_path, edit, field):
    write_cfg(tmp_path / "mm" / "rig.cfg")
    yaml_file = write_yaml(tmp_path / "rigs" / "bx51.yaml", edit(GOOD_YAML))
    with pytest.raises(ConfigError) as info:
        load_rig_config(yaml_file)
    message = str(info.value)
    assert message.startswith(f"{yaml_file}: ")
    assert re.search(rf"^\s*{field}(\.\d+)?: ", message, re.MULTILINE), message


@pytest.mark.parametrize("body", ["rig: [micromanager\n", "- just\n- a list\n", ""])
def test_a_yaml_that_is_not_a_mapping_is_refused(tmp_path, body):
    yaml_file = write_yaml(tmp_path / "rig.yaml", body)
    with pytest.raises(ConfigError, match=re.escape(str(yaml_file))):
        load_rig_config(yaml_file)


def test_a_missing_yaml_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_rig_config(tmp_path / "nope.yaml")


# ------------------------------------------------------------ the shipped BX51 example


def test_the_bx51_yaml_validates_and_points_to_the_example_cfg():
    cfg = load_rig_config(CONFIGS / "bx51.yaml")
    assert cfg.mm_config == CONFIGS / "bx51-prior.cfg"
    assert cfg.mm_config.is_file()
    assert (cfg.xy_stage, cfg.focus_drive, cfg.camera, cfg.objective_turret) == (
        "XY",
        "Z",
        "Camera",
        "Objective",
    )
    assert cfg.objective == "100x"


# Every command Micro-Manager 2.0's loader accepts, with the field counts it accepts
# (the command included). Config, Equipment and ImageSynchro are obsolete or refused.
_FIELDS = {
    CFGCommand.Device: {4},
    CFGCommand.Property: {3, 4},
    CFGCommand.Label: {4},
    CFGCommand.ConfigGroup: {2, 5, 6},
    CFGCommand.Delay: {3},
    CFGCommand.FocusDirection: {3},
    CFGCommand.ConfigPixelSize: {5},
    CFGCommand.PixelSize_um: {3},
    CFGCommand.PixelSizeAffine: {8},
    CFGCommand.ParentID: {3},
}


def _cfg_commands(path: Path) -> list[list[str]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            rows.append(line.strip().split(","))
    return rows


def test_the_example_cfg_is_valid_micro_manager_syntax():
    # The .cfg needs the Prior, QCam and DemoCamera adapters, which are not installed here
    # (nor in CI), so its syntax is checked line by line, and the next test loads it with
    # Python stand-ins for the hardware.
    path = CONFIGS / "bx51-prior.cfg"
    lines = path.read_text().splitlines()
    # "#py " is UniMMCore's prefix for Python-device lines: a comment must not start with it.
    assert not [line for line in lines if line.startswith("#py ")]
    rows = _cfg_commands(path)
    known = {c.value for c in _FIELDS}
    for fields in rows:
        assert fields[0] in known, f"unknown command: {','.join(fields)}"
        assert len(fields) in _FIELDS[CFGCommand(fields[0])], f"field count: {','.join(fields)}"
        assert all(f == f.strip() and f for f in fields[:-1]), f"blank field: {fields}"

    devices = {f[1] for f in rows if f[0] == "Device"}
    for fields in rows:
        cmd = fields[0]
        used = {
            "Property": fields[1],
            "Label": fields[1],
            "Delay": fields[1],
            "FocusDirection": fields[1],
            "Parent": fields[1],
            "ConfigPixelSize": fields[2],
            "ConfigGroup": fields[3] if len(fields) > 4 else "Core",
        }.get(cmd)
        assert used is None or used == "Core" or used in devices, f"undeclared: {fields}"
    # pixel sizes: every config has a size and is keyed on a defined objective label
    labels = {(f[1], f[3]) for f in rows if f[0] == "Label"}
    res_ids = {f[1] for f in rows if f[0] == "ConfigPixelSize"}
    assert res_ids == {f[1] for f in rows if f[0] == "PixelSize_um"}
    assert res_ids == {f[1] for f in rows if f[0] == "PixelSizeAffine"}
    for f in rows:
        if f[0] == "ConfigPixelSize":
            assert f[3] == "Label" and (f[2], f[4]) in labels, f
    assert {lbl for _, lbl in labels} == {"5x", "10x", "20x", "50x", "100x"}
    # Initialize,0 first, device loading before Initialize,1, roles after it
    assert rows[0] == ["Property", "Core", "Initialize", "0"]
    init = rows.index(["Property", "Core", "Initialize", "1"])
    assert all(i < init for i, f in enumerate(rows) if f[0] in ("Device", "Parent"))


# What each of the example's adapters is replaced with to load it here.
_STAND_INS = {
    ("Prior", "XYStage"): "StubXYStage",
    ("Prior", "ZStage"): "StubFocus",
    ("Prior", "Shutter-1"): "StubShutter",
    ("QCam", "QCamera"): "StubRGBCamera",
    ("DemoCamera", "DObjective"): "StubTurret",
}


def _with_stand_ins(path: Path) -> str:
    """The example .cfg with its hardware replaced by Python stubs, and what only real hardware
    takes (serial ports, hubs, hardware properties, delays) left out."""
    rows = _cfg_commands(path)
    kept = {f[1] for f in rows if f[0] == "Device" and (f[2], f[3]) in _STAND_INS}
    out = []
    for f in rows:
        cmd = f[0]
        if cmd == "Device":
            if f[1] in kept:
                out.append(f"#py pyDevice,{f[1]},{STUBS},{_STAND_INS[(f[2], f[3])]}")
        elif cmd in ("Parent", "Delay") or (cmd == "Property" and f[1] != "Core"):
            continue
        elif cmd == "ConfigGroup" and f[1] == "System" and f[3] != "Core":
            continue  # hardware settings applied at startup (camera colour mode, exposure)
        else:
            out.append(",".join(f))
    return "\n".join(out) + "\n"


def test_the_example_cfg_with_stand_ins_passes_the_rig_check(tmp_path, mm_core):
    cfg = load_rig_config(CONFIGS / "bx51.yaml")
    stand_in = tmp_path / "bx51-stand-ins.cfg"
    stand_in.write_text(_with_stand_ins(cfg.mm_config))
    open_micromanager_rig(cfg.model_copy(update={"mm_config": stand_in}), mm_core)
    assert mm_core.getStateLabel("Objective") == "100x"
    assert mm_core.getCurrentPixelSizeConfig() == "Res100x"
    assert mm_core.getPixelSizeUm() == pytest.approx(0.05397)
    assert mm_core.getShutterDevice() == "Lamp"
