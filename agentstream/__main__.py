"""`python -m agentstream`: the same command line as the `agentstream` console script."""

from agentstream.streams.cli import main

if __name__ == "__main__":
    main()
