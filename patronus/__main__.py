"""`python -m patronus <command> --checkpoint RUN ...` (see `patronus.cli.analyses`)."""

from patronus.cli.analyses import main

if __name__ == "__main__":
    main()
