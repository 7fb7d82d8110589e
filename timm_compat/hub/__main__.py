"""``python -m timm_compat.hub``: see :mod:`timm_compat.hub`."""
import sys

from . import main

if __name__ == '__main__':
    sys.exit(main())
