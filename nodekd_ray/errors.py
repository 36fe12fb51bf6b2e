"""One error type for bad input, so the command line can print one line and exit 2."""


class ConfigError(ValueError):
    """Bad user input: names the field and says what is allowed.

    ``str(err)`` is the one line the command line prints, e.g.
    ``lam: must be in [0, 1], got 1.5``.
    """

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def __reduce__(self):  # picklable, so it crosses Ray task boundaries intact
        return (ConfigError, (self.field, self.message))


def check_choice(field: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(field, f"unknown value {value!r}; allowed: {', '.join(map(str, allowed))}")


def check_range(field: str, value: float, lo=None, hi=None, *, lo_open=False, hi_open=False) -> None:
    """Checks lo <= value <= hi (or strict where *_open) and says the interval on failure.
    inf and nan are refused whatever the interval (no field of this project takes them)."""
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(field, f"must be a finite number, got {value}")
    bad = (
        (lo is not None and (value <= lo if lo_open else value < lo))
        or (hi is not None and (value >= hi if hi_open else value > hi))
        or value != value  # NaN
    )
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        raise ConfigError(field, f"must be in {left}{lo_s}, {hi_s}{right}, got {value:g}")


class StorageFull(RuntimeError):
    """The storage ran out of space mid-sweep: the sweep ends with one line; --resume completes it."""


NO_SPACE = "No space left on device"


def is_no_space(e: BaseException | str) -> bool:
    import errno

    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    return NO_SPACE in str(e)


class ODESolveError(RuntimeError):
    """The ODE solve failed: step-size underflow, the step limit, or a non-finite state."""
