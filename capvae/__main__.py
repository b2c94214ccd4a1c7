import sys
from capvae.cli import main

sys.exit(main())
