"""`python -m streams` and the `agentstream` console script."""

from streams.cli import main

if __name__ == "__main__":
    main()
