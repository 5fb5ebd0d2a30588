from enum import Enum


class Mode(Enum):
    HEAT = "heat"
    COOL = "cool"
    OFF = "off"


def mode_for(delta):
    return Mode.HEAT if delta > 0.5 else Mode.COOL if delta < -0.5 else Mode.OFF
