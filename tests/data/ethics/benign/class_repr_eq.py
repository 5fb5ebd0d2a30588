class Setpoint:
    def __init__(self, zone, celsius):
        self.zone, self.celsius = zone, celsius

    def __repr__(self):
        return f"Setpoint({self.zone!r}, {self.celsius})"

    def __eq__(self, other):
        return isinstance(other, Setpoint) and (self.zone, self.celsius) == (other.zone, other.celsius)
