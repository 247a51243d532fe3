"""``python -m deepscope`` is the ``deepscope`` command."""

from deepscope.cli import main

main()
