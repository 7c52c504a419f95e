import sys

from leapalign.cli import main

sys.exit(main())
