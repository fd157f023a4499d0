import sys

from catome_export.cli.main import main

sys.exit(main())
