"""`python -m deltabox.cli`: the `deltabox` command."""

import sys

from deltabox.cli.main import main

sys.exit(main())
