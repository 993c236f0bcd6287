"""``python -m edgetl``: the CLI, for launchers that start a module (torchrun -m edgetl, accelerate launch -m)."""

from edgetl.cli import main

if __name__ == "__main__":
    main()
