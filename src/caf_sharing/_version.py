"""The package version, in one place.

setuptools reads it statically for the distribution metadata
(``[tool.setuptools.dynamic]`` in pyproject.toml), and ``caf_sharing`` and
``caf-sharing --version`` import it, so a source tree run with
``PYTHONPATH=src``, an editable install, an sdist and a wheel all agree.
"""

__version__ = "0.1.0"
