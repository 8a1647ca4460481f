"""Allow ``python -m dni``."""

from dni.entry import main

main()
