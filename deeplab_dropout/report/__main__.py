"""`python -m deeplab_dropout.report DIR`, as `deeplab-dropout-report DIR`."""
import sys

from deeplab_dropout.report import main

sys.exit(main())
