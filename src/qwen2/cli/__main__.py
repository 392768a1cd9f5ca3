import sys

from qwen2.cli.main import main

sys.exit(main())
