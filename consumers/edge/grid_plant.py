"""A grid plant behind the same small interface as the HVAC site (docs/plants.md, "Grid
plants"): a power network of domains/grid.py dispatched in time (domains/grid_dynamics.py).

Telemetry (`GridTelemetry`, per step): the bus loads and the units' availability (the
context: what the dispatch must serve, which units may run), the dispatch applied, and
what the site measured — the cost and the fuel its units burned over the step (the fuel
meters: the quantity M&V measures), the primary reserve held, the N-1 reserve shortfall
(the largest unit's output beyond the others' reserve), the worst line loading and the
frequency nadir a trip of the largest unit would cause now (the SFR model). Setpoints
(`GridSetpoint`): MW per unit. The site moves each unit toward its setpoint within its
ramp; its automatic generation control shares the gap to the demand at the step's end.

The site's fuel curves differ from the nominal ones by its own `heat_rate` and `no_load`
factors, unknown to the edge: what M&V calibration must find (domains/mv.py).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import msgspec
import numpy as np

from scf.consumers.edge.plant import PlantEnded, PlantError

UTC = dt.timezone.utc
GRID_STATUS_QUO = "status-quo:prorata"


class GridTelemetry(msgspec.Struct, frozen=True, kw_only=True):
    """What a grid site measured at the end of step `seq` (seq 0: before any setpoint)."""

    seq: int
    time: dt.datetime  # plant clock, UTC, at the end of the step
    period_s: float
    units: list[str]  # the domain's unit names (state order)
    load_mw: list[float]  # per load bus, in the domain's context order
    available: list[bool]  # per unit: in service for the next step
    pg_mw: list[float]  # per unit, applied over the step
    demand_mw: float = 0.0
    imbalance_mw: float = 0.0  # generation - demand (0 unless the units could not follow)
    cost_usd: float = 0.0  # over the step: the fuel burned at the site's fuel price
    fuel_kwh: float = 0.0  # over the step: the fuel meters' increment, kWh of fuel (thermal)
    fuel_price_usd_mwh: float = 1.0  # USD per MWh of fuel: the cost curves are heat-rate curves times it
    reserve_mw: float = 0.0  # primary reserve held
    shortfall_mw: float = 0.0  # N-1: the largest unit's output beyond the others' reserve
    max_loading: float = 0.0  # worst |flow| / rateA
    nadir_hz: float = 60.0  # the frequency nadir if the largest running unit tripped now

    def hour(self) -> float:
        t = self.time.astimezone(UTC)
        return t.hour + t.minute / 60.0 + t.second / 3600.0

    @property
    def zones(self) -> list[str]:  # the MQTT adapter's name for the plant's actuators
        return self.units


class GridSetpoint(msgspec.Struct, frozen=True, kw_only=True):
    """The dispatch for the step after telemetry `seq`, MW per unit."""

    seq: int
    pg_mw: list[float]
    controller: str = ""


GRID_TELEMETRY = msgspec.json.Decoder(GridTelemetry)
GRID_SETPOINT = msgspec.json.Decoder(GridSetpoint)


class GridSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[edge.control.grid]`: the envelope of a grid loop and its in-process simulated site."""

    line_margin: float = 0.0  # a setpoint loading a line above rateA by more than this fraction breaks the envelope
    max_shortfall_mw: float | None = None  # N-1 reserve shortfall a setpoint may leave (None: not checked)
    min_nadir_hz: float | None = None  # the monitor: an N-1 nadir below this ...
    breach_periods: int = 3  # ... for this many periods in a row is a breach (also the shortfall, measured)
    meter: str = "fuel"  # the meter a grid measurement names (the ledger admits it when the node's label meters= lists it)
    sim_seed: int = 3
    sim_hours: float = 48.0
    sim_step_minutes: float = 15.0
    sim_factors: str = "heat_rate=1.08,no_load=0.8"
    sim_outages: str = ""  # e.g. "Pg3@bus22=30+4": out from hour 30 for 4 hours
    sim_fuel_price: float = 1.0


@dataclass(frozen=True)
class GridSiteOptions:
    domain: str = "grid:case30"
    seed: int = 3
    hours: float = 48.0
    step_minutes: float = 15.0
    start: dt.datetime = dt.datetime(2026, 1, 5, tzinfo=UTC)
    factors: tuple[tuple[str, float], ...] = (("heat_rate", 1.08), ("no_load", 0.8))
    outages: tuple[tuple[str, float, float], ...] = ()  # (unit, from hour, hours)
    fuel_price: float = 1.0  # USD per MWh of fuel
    meter_noise: float = 0.01  # relative std of each fuel reading

    @classmethod
    def from_settings(cls, s: GridSettings, domain: str) -> "GridSiteOptions":
        return cls(domain=domain, seed=s.sim_seed, hours=s.sim_hours, step_minutes=s.sim_step_minutes,
                   factors=parse_grid_factors(s.sim_factors), outages=parse_outages(s.sim_outages), fuel_price=s.sim_fuel_price)


def parse_grid_factors(text: str) -> tuple[tuple[str, float], ...]:
    from scf.domains.mv import GRID_PARAMETERS

    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in GRID_PARAMETERS:
            raise PlantError(f"unknown grid site factor {name!r}: use {', '.join(GRID_PARAMETERS)} (e.g. heat_rate=1.08)")
        try:
            out.append((name, float(value)))
        except ValueError:
            raise PlantError(f"grid site factor {name}={value!r} is not a number") from None
    return tuple(out)


def parse_outages(text: str) -> tuple[tuple[str, float, float], ...]:
    """`UNIT=FROM+HOURS,...` (hours of the plant's run) → triples."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        unit, _, when = part.rpartition("=")
        start, _, length = when.partition("+")
        try:
            out.append((unit, float(start), float(length)))
        except ValueError:
            raise PlantError(f"outage {part!r}: write UNIT=FROM_HOUR+HOURS (e.g. Pg3@bus22=30+4)") from None
        if not unit:
            raise PlantError(f"outage {part!r}: name the unit (e.g. Pg3@bus22=30+4)")
    return tuple(out)


def grid_domain(name: str):
    from scf import domains

    try:
        d = domains.get(name)
    except Exception as exc:  # noqa: BLE001 - an unknown domain name is one line
        raise PlantError(f"unknown domain {name!r}: {exc}") from None
    if getattr(d, "kind", "") != "grid":
        raise PlantError(f"domain {name} is not a grid domain (e.g. grid:case30)")
    return d


class GridSite:
    """The simulated grid site: the domain's units over a stochastic load trajectory, with
    the site's own fuel curves, outages and a fuel meter with noise."""

    setpoint_decoder = GRID_SETPOINT

    def __init__(self, options: GridSiteOptions) -> None:
        from scf.domains.grid_dynamics import GridPlant, load_trajectory, share_within

        if options.fuel_price <= 0:
            raise PlantError(f"fuel price {options.fuel_price:g}: give the site's price per MWh of fuel (> 0)")
        self.options = options
        self.domain = grid_domain(options.domain)
        self.dt_h = options.step_minutes / 60.0
        self.plant = GridPlant(self.domain, self.dt_h)
        self.steps = max(1, round(options.hours / self.dt_h))
        self.loads = load_trajectory(self.domain, scenarios=1, steps=self.steps + 1, dt_h=self.dt_h, seed=options.seed)[0][0]
        self.zones = tuple(self.domain.state_names)
        self.available = np.ones((self.steps + 1, len(self.zones)), dtype=bool)
        for unit, start, hours in options.outages:
            if unit not in self.zones:
                raise PlantError(f"outage of {unit!r}: {options.domain} has units {', '.join(self.zones)}")
            g = self.zones.index(unit)
            k0 = round(start / self.dt_h)
            self.available[max(0, k0) : max(0, k0 + round(hours / self.dt_h)), g] = False
        self.factors = dict(options.factors)
        self.rng = np.random.default_rng([options.seed, 98])
        # the site has been running its status quo: the first dispatch meets the first load
        lo = np.where(self.available[0], self.domain.pmin, 0.0)
        hi = np.where(self.available[0], self.domain.pmax, 0.0)
        self.pg = share_within(lo, hi, lo, self.domain.demand(self.loads[0]))
        self.seq = 0
        self.last = self._telemetry(None)

    @staticmethod
    def values(sp: GridSetpoint) -> list[float]:
        return sp.pg_mw

    @property
    def ended(self) -> bool:
        return self.seq >= self.steps

    def _telemetry(self, fuel_kwh: float | None) -> GridTelemetry:
        from scf.domains.grid_dynamics import n1_nadir_hz

        k = self.seq
        m = self.plant.measure(self.pg[None, :], self.loads[k][None, :])
        fuel = 0.0 if fuel_kwh is None else fuel_kwh
        return GridTelemetry(
            seq=k,
            time=self.options.start + dt.timedelta(hours=k * self.dt_h),
            period_s=self.dt_h * 3600.0,
            units=list(self.zones),
            load_mw=[float(x) for x in self.loads[k]],
            available=[bool(x) for x in self.available[k]],
            pg_mw=[float(x) for x in self.pg],
            demand_mw=float(m.demand_mw[0]),
            imbalance_mw=float(m.imbalance_mw[0]),
            cost_usd=fuel / 1000.0 * self.options.fuel_price,
            fuel_kwh=fuel,
            fuel_price_usd_mwh=self.options.fuel_price,
            reserve_mw=float(m.reserve_mw[0]),
            shortfall_mw=float(m.shortfall_mw[0]),
            max_loading=float(m.max_loading[0]),
            nadir_hz=n1_nadir_hz(self.plant, self.pg, self.available[min(k, self.steps)], float(m.demand_mw[0])),
        )

    def apply(self, pg_mw) -> GridTelemetry:
        """Move toward `pg_mw` over the next step (ramps, outages, AGC); the telemetry at its end."""
        from scf.domains.grid_dynamics import agc_step, fuel_rates

        if self.ended:
            raise PlantEnded(f"the simulated plant's {self.options.hours:g} h are over")
        u = np.asarray(pg_mw, dtype=float)
        if u.shape != (len(self.zones),) or not np.isfinite(u).all():
            raise PlantError(f"setpoint needs {len(self.zones)} finite numbers (MW per unit: {', '.join(self.zones)}), got {pg_mw!r}")
        k = self.seq
        self.pg = agc_step(self.plant, self.pg, self.available[k], u, self.loads[k + 1])
        var, nl = fuel_rates(self.domain, self.pg, self.factors, self.options.fuel_price)
        fuel = float(var + nl) * 1000.0 * self.dt_h * max(0.0, 1.0 + self.options.meter_noise * self.rng.standard_normal())
        self.seq += 1
        self.last = self._telemetry(fuel)
        return self.last


class GridSimPlant:
    """The simulated grid site in this process: a step per setpoint."""

    def __init__(self, options: GridSiteOptions) -> None:
        self.site = GridSite(options)
        self.zones = self.site.zones

    async def telemetry(self, after: int) -> GridTelemetry:
        if self.site.last.seq <= after:
            raise PlantEnded(f"the simulated plant's {self.site.options.hours:g} h are over")
        return self.site.last

    async def write(self, setpoint: GridSetpoint) -> None:
        if setpoint.seq == self.site.seq and not self.site.ended:
            self.site.apply(setpoint.pg_mw)

    async def close(self) -> None:
        pass
