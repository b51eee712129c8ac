"""A solver, registered through the public registry, that records the dtypes it works in."""
from deq_core import anderson, register_solver


class DtypeSpy:
    """Anderson acceleration that records the dtype of its state and of the map's outputs."""

    def __init__(self):
        self.state, self.outputs = set(), set()

    def clear(self):
        self.state.clear()
        self.outputs.clear()

    def __call__(self, f, z0, **kw):
        self.state.add(z0.dtype)

        def watched(z):
            out = f(z)
            self.outputs.add(out.dtype)
            return out

        return anderson(watched, z0, **kw)


def register_dtype_spy(name: str = "dtype_spy") -> DtypeSpy:
    """Register a fresh spy under ``name`` (replacing an earlier one) and return it."""
    spy = DtypeSpy()
    register_solver(name, {}, overwrite=True)(spy)
    return spy
