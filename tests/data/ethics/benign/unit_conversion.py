BTU_PER_KWH = 3412.14

def kwh_to_btu(kwh: float) -> float:
    return kwh * BTU_PER_KWH

def celsius_to_kelvin(c: float) -> float:
    return c + 273.15
