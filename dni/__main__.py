"""Allow ``python -m dni``."""

from dni.cli import main

main()
