class Handler:
    def on_load(self, x):
        return x * 2

    def on_price(self, x):
        return x + 1

    def handle(self, kind, x):
        return getattr(self, "on_" + kind)(x)
