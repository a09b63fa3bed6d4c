"""Package discovery for dite's folder layout (the rest of the metadata is in pyproject.toml).

`dite` is a PEP 420 namespace whose sub-packages live in top-level folders (`engine/` is
`dite.engine`, ...). setuptools' pyproject-only discovery cannot combine a folder mapping
with automatic discovery, so it is done here: every package (a folder with `__init__.py`)
under a mapped folder is included. tests/test_packaging.py checks that no folder holding
Python modules is missed.
"""

from setuptools import find_packages, setup

FOLDERS = {"dite.engine": "engine", "dite.models": "models", "dite.schedulers": "schedulers", "dite.accel": "accel"}


def packages_and_dirs() -> tuple[list[str], dict[str, str]]:
    packages, dirs = [], {}
    for name, folder in FOLDERS.items():
        packages.append(name)
        dirs[name] = folder
        for sub in find_packages(where=folder):
            packages.append(f"{name}.{sub}")
            dirs[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"
    return packages, dirs


PACKAGES, PACKAGE_DIRS = packages_and_dirs()

if __name__ == "__main__":
    setup(packages=PACKAGES, package_dir=PACKAGE_DIRS)
