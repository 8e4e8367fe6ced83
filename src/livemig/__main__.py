"""`python -m livemig` is the `livemig` command."""

from livemig.cli.main import main

main()
