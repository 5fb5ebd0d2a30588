from dataclasses import dataclass, field


@dataclass
class SolverConfig:
    tol: float = 1e-6
    max_iter: int = 500
    weights: list[float] = field(default_factory=lambda: [1.0, 0.5])

    def scaled(self, k: float) -> "SolverConfig":
        return SolverConfig(self.tol * k, self.max_iter, [w * k for w in self.weights])
