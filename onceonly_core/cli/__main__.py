"""``python -m onceonly_core.cli`` is ``onceonly``."""

from . import main

main()
