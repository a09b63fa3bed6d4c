"""The installed dite version, recorded in images and converted files."""


def dite_version() -> str:
    try:
        from importlib.metadata import version

        return version("dite")
    except Exception:  # running from a source tree that is not installed
        return "unknown"
