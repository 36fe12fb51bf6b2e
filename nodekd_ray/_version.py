"""The package's version: written here once (pyproject.toml reads it). 0.2.0: one --speed switch, the speed
package, the computation study."""
__version__ = "0.2.0"


def version_line() -> str:
    """What --version prints: this package's version and torch's (Ray's too where it is installed)."""
    import importlib.util

    from importlib.metadata import PackageNotFoundError, version

    parts = [f"nodekd-ray {__version__}"]
    for dist in ("torch", "ray"):
        if importlib.util.find_spec(dist) is not None:
            try:
                parts.append(f"{dist} {version(dist)}")
            except PackageNotFoundError:
                pass
    return ", ".join(parts)
