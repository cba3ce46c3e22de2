import sys

from mpi.cli import main

sys.exit(main())
