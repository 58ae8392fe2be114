"""The simulated microscope: a UniMMCore whose devices look at a synthetic chip.

from drivers.simulated import simulated_rig
with simulated_rig("configs/simulated.yaml") as core:
    core.setXYPosition(2500, 2500); core.waitForDevice(core.getXYStageDevice())
    core.snapImage(); frame = core.getImage()          # 512×512×3 uint8
    truth = core.simulation.world.flakes                # what is really there
"""

from .config import ConfigError, SimulatedRigConfig, load_simulated_config
from .devices import SimulatedHardwareError, SimulatedMicroscope, StageLimitError
from .rig import RigStartError, SimulatedCore, create_simulated_core, simulated_rig
from .world import ChipWorld, TruthFlake

__all__ = [
    "ChipWorld",
    "ConfigError",
    "RigStartError",
    "SimulatedCore",
    "SimulatedHardwareError",
    "SimulatedMicroscope",
    "SimulatedRigConfig",
    "StageLimitError",
    "TruthFlake",
    "create_simulated_core",
    "load_simulated_config",
    "simulated_rig",
]
