"""`python -m qwen2.cli.precompile SPEC PATH`: the chat's background compile, in a process of its own."""

import sys

from qwen2.cli.warmup import compile_in_child

if __name__ == "__main__":
    sys.exit(compile_in_child(sys.argv[1:]))
