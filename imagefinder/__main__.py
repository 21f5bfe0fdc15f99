"""``python -m imagefinder``: the ``imagefinder`` command."""

from .cli import main

main()
