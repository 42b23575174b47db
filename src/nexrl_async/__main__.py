"""``python -m nexrl_async`` and ``torchrun -m nexrl_async``: the same CLI as ``nexrl-async``."""

from nexrl_async.cli import main

if __name__ == "__main__":
    main()
