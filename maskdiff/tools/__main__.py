"""``python -m maskdiff.tools``: the ``maskdiff`` command."""

from maskdiff.tools.main import main

main()
