from typing import Generic, TypeVar

T = TypeVar("T")


class Window(Generic[T]):
    def __init__(self, size: int) -> None:
        self.size, self.items = size, []

    def push(self, item: T) -> None:
        self.items = (self.items + [item])[-self.size:]
