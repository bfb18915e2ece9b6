"""``python -m trio_dpsup``: the same as the ``trio-dpsup`` console script."""

from ._cli import main

if __name__ == "__main__":
    main()
