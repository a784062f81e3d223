"""
Packaging for imageio, the Twisted oVirt image I/O service.

The import package is C{imageio}; the distribution is C{tximageio} so it is
not confused with PyPI's unrelated C{imageio} image library (both install
the same import name: use a virtual environment).
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(
    r'^__version__ = "([^"]+)"', (here / "imageio" / "__init__.py").read_text(), re.M
).group(1)

setup(
    name="tximageio",
    version=version,
    description="oVirt image I/O daemon and proxy on Twisted",
    long_description=(here / "README.rst").read_text(),
    long_description_content_type="text/x-rst",
    license="GPL-2.0-or-later",
    python_requires=">=3.11",
    # twisted.plugins is a namespace shared by every Twisted plugin: ship only
    # our module in it, never an __init__.py.
    packages=find_packages(exclude=["tests", "tests.*", "bench", "bench.*"]) + ["twisted.plugins"],
    package_data={"twisted.plugins": ["imageio_plugin.py"], "imageio": ["py.typed"]},
    install_requires=[
        # The oldest and newest releases .ci/run tests with; <27: the next
        # major after the newest tested (26.10).
        "twisted>=24.7,<27",
        "pyopenssl>=24",
        "service-identity>=24",
        "attrs>=23.1",
    ],
    extras_require={
        "test": [
            "hypothesis",
            "mypy",
            "mypy-zope",
            "ruff",
            "coverage",
            # Release notes: newsfragments/ are checked by .ci/run.
            "towncrier",
            # The packaging test builds a wheel without build isolation.
            "wheel",
            # Conformance tests run upstream's own client against us.
            "ovirt-imageio==2.5.1",
        ],
    },
    entry_points={
        "console_scripts": [
            "imageio-ctl = imageio.control.ctl:main",
            "imageio-client = imageio.client._cli:command",
        ],
    },
    classifiers=[
        "Framework :: Twisted",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
    ],
)
