import sys

from icp_lens.cli import main

sys.exit(main())
